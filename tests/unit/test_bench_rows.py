"""Which rows `bench engine` runs, and with what speculative config."""

from tandem_vllm.bench.engine import rows_for


def test_rows_without_and_with_a_router():
    plain = rows_for(tandem="/d/tandem", baseline="/d/base", k=3, fallback_batch_size=8)
    assert [r.name for r in plain] == ["target alone", "n-gram lookup (k=3)", "SPEED (standalone drafter, k=3)",
                                       "Tandem+SPEED (k=3)", "Tandem+SPEED adaptive (k=3, off at batch >= 8)"]
    assert plain[1].speculative_config == {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5,
                                           "num_speculative_tokens": 3}
    assert plain[4].speculative_config["model"] == "/d/tandem"
    assert plain[4].speculative_config["num_speculative_tokens_per_batch_size"] == [(1, 7, 3), (8, 1 << 20, 0)]
    # sampled requests draft from the drafters' distributions (greedy ones still take the argmax)
    assert all(r.speculative_config["draft_sample_method"] == "probabilistic" for r in plain[2:])
    routed = rows_for(tandem="/d/tandem", baseline=None, k=3, fallback_batch_size=8, tandem_router="/d/adaptive",
                      ngram=False)
    assert [r.name for r in routed] == ["target alone", "Tandem+SPEED (k=3)", "Tandem+SPEED router (k<=3)",
                                        "Tandem+SPEED adaptive (router, k<=3, off at batch >= 8)"]
    sampled = {"draft_sample_method": "probabilistic"}
    assert routed[1].speculative_config == {"model": "/d/tandem", "num_speculative_tokens": 3, **sampled}  # stays fixed
    assert routed[2].speculative_config == {"model": "/d/adaptive", "num_speculative_tokens": 3, **sampled}
    assert routed[3].speculative_config["model"] == "/d/adaptive"
    assert [r.name for r in rows_for(tandem="t", baseline=None, k=2, fallback_batch_size=0, ngram=False)] == [
        "target alone", "Tandem+SPEED (k=2)"]
