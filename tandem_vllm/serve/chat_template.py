"""What a model's chat template can say of OpenAI's tool calling.

vLLM renders every chat request through the model's template. A template that never reads the
request's ``tools`` drops the tool definitions from the prompt, and one that never reads a message's
``tool_calls`` drops an assistant's earlier calls: the model answers a conversation other than the one
sent, and the client gets 200. ``ToolSupport`` is read from the template's syntax tree once per
replica, and ``tool_error`` names the field such a request would lose, so the server answers 400 instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes


@dataclass(frozen=True)
class ToolSupport:
    definitions: bool  # the template reads the request's ``tools``
    calls: bool  # the template reads an assistant message's ``tool_calls``


def tool_support(templates: Iterable[str]) -> ToolSupport | None:
    """What the given templates (the ones the chat route may render with) express, taken together;
    None when there is no template or one does not parse (then nothing is refused on its account)."""
    env = jinja2.Environment(extensions=[jinja2.ext.loopcontrols, jinja2.ext.do])
    definitions = calls = False
    found = False
    for text in templates:
        try:
            ast = env.parse(text)
        except jinja2.TemplateSyntaxError:
            return None
        found = True
        definitions |= "tools" in jinja2.meta.find_undeclared_variables(ast)
        calls |= any(_names_tool_calls(n) for n in ast.find_all((nodes.Getattr, nodes.Const)))
    return ToolSupport(definitions, calls) if found else None


def _names_tool_calls(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Getattr):
        return node.attr == "tool_calls"
    return isinstance(node, nodes.Const) and node.value == "tool_calls"  # message['tool_calls'], 'tool_calls' in m


def tool_error(request: dict[str, Any], support: ToolSupport) -> tuple[str, str] | None:
    """(message, param) when the request carries tool calling the template would drop, else None. A
    named or required ``tool_choice`` is served: the output is constrained to the tools' schemas whether
    or not the prompt shows them."""
    if request.get("chat_template") is not None:
        return None  # the request brings its own template (vLLM refuses it unless the server trusts it)
    messages = request.get("messages")
    if not support.calls and isinstance(messages, list):
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
                return ("This model's chat template cannot express an assistant's tool calls: the call would be "
                        "left out of the prompt. Send it as the message's content, or serve the model with a chat "
                        "template that renders tool_calls (chat_template).", f"messages[{i}].tool_calls")
    tools, choice = request.get("tools"), request.get("tool_choice")
    if not support.definitions and tools and choice in (None, "auto"):
        return ("This model's chat template cannot express tool definitions: the model would never see the tools "
                "and could not choose one. Name the tool in tool_choice (the output is then constrained to its "
                "arguments), set tool_choice to 'required', or serve the model with a chat template that renders "
                "tools (chat_template).", "tools")
    return None
