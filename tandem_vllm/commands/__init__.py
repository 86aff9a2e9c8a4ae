"""The ``tandem-vllm`` commands, one module each: ``add(sub)`` registers the command's parser (its
flags, help, and the function it runs). ``tandem_vllm.cli`` assembles them in this order."""

from __future__ import annotations

from tandem_vllm.commands import (
    bench,
    demo,
    eval,
    gen_data,
    generate,
    import_gguf,
    serve,
    target_pass,
    train,
    train_router,
)

COMMANDS = (train, gen_data, import_gguf, target_pass, train_router, eval, generate, bench, serve, demo)
