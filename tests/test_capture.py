import math

import torch

from cfsp.arch import adapter_for
from cfsp.engine.capture import capture
from cfsp.engine.statistics import Statistics, angular_distance, symmetric_product
from tests.conftest import random_windows, tiny_model


def _record(seen):
    def hook(_module, args, kwargs, out):
        seen["in"].append(kwargs.get("hidden_states", args[0] if args else None))
        seen["out"].append(out[0] if isinstance(out, tuple) else out)

    return hook


def _direct_inputs(model, ids):
    """Inputs of every o_proj / down_proj and every block's in/out, from a plain full forward."""
    adapter = adapter_for(model)
    seen = {"o": [], "down": [], "in": [], "out": []}
    hooks = []
    for block in adapter.layers(model):
        p = adapter.parts(block)
        hooks.append(p.o.register_forward_pre_hook(lambda m, a: seen["o"].append(a[0])))
        hooks.append(p.down.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0])))
        hooks.append(block.register_forward_hook(_record(seen), with_kwargs=True))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def test_capture_matches_a_plain_forward(tiny):
    windows = random_windows(n=5, seqlen=12)
    stats = capture(tiny, windows, batch_size=2, progress=False)
    seen = _direct_inputs(tiny, windows.ids)
    for i, block in enumerate(stats.blocks):
        x = seen["down"][i].reshape(-1, seen["down"][i].shape[-1]).double()
        assert block.down.count == x.shape[0] == 60
        torch.testing.assert_close(
            block.down.sum, x.sum(0), rtol=1e-5, atol=1e-6, check_dtype=False
        )
        torch.testing.assert_close(
            block.down.gram, x.T @ x, rtol=1e-4, atol=1e-5, check_dtype=False
        )
        xo = seen["o"][i].reshape(-1, seen["o"][i].shape[-1]).double()
        torch.testing.assert_close(
            block.o.var, xo.var(0, unbiased=False), rtol=1e-3, atol=1e-6, check_dtype=False
        )
        ang = angular_distance(seen["in"][i], seen["out"][i]).mean()
        assert math.isclose(block.angular, float(ang), rel_tol=1e-5)
        assert 0.0 <= block.angular <= 1.0


def test_angular_distance_of_zero_vector_is_half():
    h = torch.zeros(1, 2, 4)
    out = torch.ones(1, 2, 4)
    assert torch.allclose(angular_distance(h, out), torch.full((1, 2), 0.5, dtype=torch.float64))
    same = torch.randn(1, 3, 4)
    assert torch.allclose(
        angular_distance(same, same), torch.zeros(1, 3, dtype=torch.float64), atol=1e-6
    )


def test_angular_distance_is_the_float64_arccos_at_every_angle():
    torch.manual_seed(0)
    a = torch.randn(4, 16, 64, dtype=torch.float64)
    for scale in (1e-4, 1e-2, 1.0, 10.0):  # near-identical to unrelated
        b = a + scale * torch.randn_like(a)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        expected = torch.arccos(cos.clamp(-1, 1)) / math.pi
        assert torch.allclose(angular_distance(a, b), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(angular_distance(a, -a), torch.ones(4, 16, dtype=torch.float64))


def test_symmetric_product_is_the_gram_matrix():
    rows = torch.randn(300, 1000)
    gram = symmetric_product(rows.T.contiguous(), tile=256)  # 4 bands
    assert torch.equal(gram, gram.T)
    assert torch.allclose(gram, rows.T @ rows, rtol=1e-4, atol=1e-3)
    small = torch.randn(50, 100)
    one = symmetric_product(small.T.contiguous(), tile=256)  # one band
    assert torch.allclose(one, small.T @ small, rtol=1e-4, atol=1e-4)
    rows = rows.bfloat16()  # the streamed engine's case: exact inputs, bf16 product
    gram = symmetric_product(rows.T.contiguous(), tile=256).float()
    exact = rows.double().T @ rows.double()
    assert ((gram - exact).norm() / exact.norm()).item() < 4e-3


def test_statistics_roundtrip(tmp_path):
    model = tiny_model("llama-gqa")
    stats = capture(model, random_windows(), batch_size=4, progress=False)
    stats.save(tmp_path / "stats.safetensors")
    back = Statistics.load(tmp_path / "stats.safetensors")
    assert back.fingerprint == stats.fingerprint
    assert [b.angular for b in back.blocks] == [b.angular for b in stats.blocks]
    torch.testing.assert_close(back.blocks[1].down.gram, stats.blocks[1].down.gram)
