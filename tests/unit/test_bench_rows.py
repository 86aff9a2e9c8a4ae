"""Which rows `bench engine` runs, and with what speculative config."""

from tandem_vllm.bench.engine import rows_for


def test_rows_without_and_with_a_router():
    plain = rows_for(tandem="/d/tandem", baseline="/d/base", k=3, fallback_batch_size=8)
    assert [r.name for r in plain] == ["target alone", "SPEED (standalone drafter, k=3)", "Tandem+SPEED (k=3)",
                                       "Tandem+SPEED adaptive (k=3, off at batch >= 8)"]
    assert plain[3].speculative_config["model"] == "/d/tandem"
    assert plain[3].speculative_config["num_speculative_tokens_per_batch_size"] == [(1, 7, 3), (8, 1 << 20, 0)]
    routed = rows_for(tandem="/d/tandem", baseline=None, k=3, fallback_batch_size=8, tandem_router="/d/adaptive")
    assert [r.name for r in routed] == ["target alone", "Tandem+SPEED (k=3)", "Tandem+SPEED router (k<=3)",
                                        "Tandem+SPEED adaptive (router, k<=3, off at batch >= 8)"]
    assert routed[1].speculative_config == {"model": "/d/tandem", "num_speculative_tokens": 3}  # the fixed row stays fixed
    assert routed[2].speculative_config == {"model": "/d/adaptive", "num_speculative_tokens": 3}
    assert routed[3].speculative_config["model"] == "/d/adaptive"
    assert [r.name for r in rows_for(tandem="t", baseline=None, k=2, fallback_batch_size=0)] == [
        "target alone", "Tandem+SPEED (k=2)"]
