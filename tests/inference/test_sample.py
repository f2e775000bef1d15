"""KV-cache decoding against full-forward recomputation and against transformers' generate."""

import warnings

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo.errors import ConfigError
from gpt_neo.inference.sample import Sampling, _prepare, choose
from tests.support.helpers import (
    HF_CONFIG,
    assert_greedy_equals_hf_generate,
    perturbed_params,
    random_hf_model,
    tiny_config,
)

# Lengths differ so that rows are left-padded differently; 11 + 12 new tokens pass the local
# window (8), so cached local attention must drop old keys.
PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7, 7, 100, 3, 64, 2]]


def assert_greedy(cfg, params, prompts, outputs, tolerance=1e-4):
    """Every new token is the argmax of a full, uncached forward over everything before it
    (ties within float noise allowed)."""
    for prompt, new in zip(prompts, outputs, strict=True):
        sequence = np.array([prompt + new[:-1]], np.int32)
        logits = np.asarray(gpt_neo.apply(cfg, params, sequence))[0]
        for k, token in enumerate(new):
            row = logits[len(prompt) - 1 + k]
            assert row[token] >= row.max() - tolerance, (prompt, k, token, int(row.argmax()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kinds",
    [["global", "local", "linear", "none"], ["local"] * 2, ["linear", "global"]],
    ids=["every-kind", "local", "linear"],
)
def test_greedy_equals_argmax_of_a_full_forward_at_every_step(kinds):
    cfg = tiny_config(attention_types=kinds, n_layer=len(kinds))
    params = perturbed_params(cfg)
    out = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0)
    assert [len(o) for o in out] == [12, 12, 12]
    assert_greedy(cfg, params, PROMPTS, out)


@pytest.mark.slow
def test_bfloat16_decoding_follows_the_bfloat16_forward():
    cfg = tiny_config(precision="bfloat16")
    params = perturbed_params(cfg)
    out = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert_greedy(cfg, params, PROMPTS, out, tolerance=0.1)  # bfloat16 logits: ~1e-2 noise


@pytest.mark.slow
def test_greedy_equals_transformers_generate(tmp_path):
    model = random_hf_model(tmp_path, **{**HF_CONFIG, "window_size": 5})
    cfg, params = gpt_neo.hf.import_hf(tmp_path)
    assert_greedy_equals_hf_generate(cfg, params, model, new_tokens=16)


def test_a_row_of_packed_prompts_decodes_its_last_prompt_as_if_alone():
    # every layer kind, and memory slots (which every prompt sees, as it would alone)
    cfg = tiny_config(num_mem_kv=2)
    params = perturbed_params(cfg)
    # row 0 packs all three prompts, row 1 two of them; each continues its last prompt
    rows = [PROMPTS[0] + PROMPTS[1] + PROMPTS[2], PROMPTS[2] + PROMPTS[0]]
    segments = [
        [1] * len(PROMPTS[0]) + [2] * len(PROMPTS[1]) + [3] * len(PROMPTS[2]),
        [1] * len(PROMPTS[2]) + [2] * len(PROMPTS[0]),
    ]
    packed = gpt_neo.generate(
        cfg, params, rows, max_new_tokens=10, temperature=0.0, segment_ids=segments
    )
    alone = gpt_neo.generate(
        cfg, params, [PROMPTS[2], PROMPTS[0]], max_new_tokens=10, temperature=0.0
    )
    assert packed == alone


def test_sharded_decoding_equals_single_device():
    cfg = tiny_config(mesh_shape="x:2,y:4", layout="batch:x,heads:y,vocab:y")
    params = perturbed_params(cfg)
    single = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=8, temperature=0.0)
    mesh = gpt_neo.make_mesh(cfg)
    sharded_params = jax.device_put(params, gpt_neo.models.gpt.param_shardings(cfg, mesh))
    sharded = gpt_neo.generate(cfg, sharded_params, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert sharded == single  # 3 prompts on a batch axis of 2: padded, then dropped


@pytest.mark.slow
def test_prompts_are_left_padded_with_padding_id_which_never_shows():
    cfg = tiny_config()
    rows, _, _ = _prepare(cfg.replace(padding_id=99), PROMPTS, 4)
    for row, prompt in zip(rows, PROMPTS, strict=True):
        assert list(row) == [99] * (rows.shape[1] - len(prompt)) + prompt
    params = perturbed_params(cfg)
    outputs = [
        gpt_neo.generate(
            cfg.replace(padding_id=p), params, PROMPTS, max_new_tokens=6, temperature=0
        )
        for p in (None, 5, 99)
    ]
    alone = [
        gpt_neo.generate(cfg, params, [p], max_new_tokens=6, temperature=0)[0] for p in PROMPTS
    ]
    assert outputs[0] == outputs[1] == outputs[2] == alone


def test_rows_stop_at_eos_and_keep_it():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    free = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=0.0, eos_id=None)
    eos = free[1][3]  # row 1's fourth token
    stopped = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=0.0, eos_id=eos)
    for full, cut in zip(free, stopped, strict=True):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected
    assert len(stopped[1]) <= 4


def test_streaming_yields_the_same_tokens_as_the_compiled_loop():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    kwargs = dict(max_new_tokens=9, temperature=0.8, top_k=20, seed=3)
    whole = gpt_neo.generate(cfg, params, PROMPTS, **kwargs)
    seen = []
    streamed = gpt_neo.generate(cfg, params, PROMPTS, on_token=seen.append, **kwargs)
    assert streamed == whole
    assert [[step[i] for step in seen] for i in range(len(PROMPTS))] == whole


def test_sampling_follows_the_seed():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    run = lambda seed: gpt_neo.generate(  # noqa: E731
        cfg, params, PROMPTS, max_new_tokens=12, temperature=1.0, seed=seed
    )
    assert run(1) == run(1)
    assert run(1) != run(2)
    top1 = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1)
    greedy = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0)
    assert top1 == greedy


def nucleus(probs, top_p):
    """Reference: the smallest most-likely-first set whose mass reaches top_p."""
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    return set(order[: int(np.searchsorted(mass, top_p)) + 1].tolist())


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (4, 0.9)])
def test_top_k_and_top_p_draw_only_from_the_allowed_set(top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 2, (1, 50)).astype(np.float32)
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    allowed = set(np.argsort(-probs)[:top_k].tolist()) if top_k else set(range(50))
    if top_p < 1.0:
        kept = probs * np.isin(np.arange(50), list(allowed))
        allowed &= nucleus(kept / kept.sum(), top_p)
    sampling = Sampling(temperature=1.0, top_k=top_k, top_p=top_p)
    draw = jax.jit(lambda key: choose(jax.numpy.asarray(logits), sampling, key))
    drawn = {int(draw(jax.random.key(i))[0]) for i in range(300)}
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 3)  # it samples, not argmax


def test_long_prompts_keep_their_end_and_generation_stops_at_n_ctx():
    cfg = tiny_config()  # n_ctx 32
    params = perturbed_params(cfg)
    long_prompt = list(range(1, 41))
    with pytest.warns(UserWarning, match="longer than n_ctx"):
        out = gpt_neo.generate(cfg, params, [long_prompt], max_new_tokens=5, temperature=0.0)
    assert len(out[0]) == 1  # 31 prompt tokens kept, one position left
    assert_greedy(cfg, params, [long_prompt[-31:]], out)
    with warnings.catch_warnings(), pytest.warns(UserWarning, match="would pass n_ctx"):
        gpt_neo.generate(cfg, params, [[1] * 30], max_new_tokens=5, temperature=0.0)


def test_bad_prompts_and_knobs_are_refused():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    with pytest.raises(ConfigError, match="empty"):
        gpt_neo.generate(cfg, params, [[1, 2], []], max_new_tokens=3)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        gpt_neo.generate(cfg, params, [[1, 999]], max_new_tokens=3)
    with pytest.raises(ConfigError, match="top_p"):
        gpt_neo.generate(cfg, params, [[1]], max_new_tokens=3, top_p=0.0)
