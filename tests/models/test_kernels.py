"""The oneDNN linear kernel for float32 CPU weights."""

import pytest
import torch
from torch import nn

from via_sd_ray.models import kernels
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.loading import load_model, resolve

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (6, 64), (1, 5, 64), (2, 3, 64)])
def test_onednn_linear_matches_torch(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    x = torch.randn(*shape)
    out = kernels.OneDNNLinear(lin)(x)
    assert out.shape == (*shape[:-1], 48)
    torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)


def test_resolve_chooses_per_device_and_dtype():
    assert kernels.resolve("auto", "cpu", torch.float32) == "onednn"
    assert kernels.resolve("auto", "cpu", torch.bfloat16) == "aten"
    assert kernels.resolve("auto", "cpu", torch.float64) == "aten"
    assert kernels.resolve("auto", "cuda", torch.float32) == "aten"
    assert kernels.resolve("aten", "cpu", torch.float32) == "aten"
    with pytest.raises(ValueError, match="needs float32 weights on a CPU"):
        kernels.resolve("onednn", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="expected one of"):
        kernels.resolve("mkl", "cpu", torch.float32)


def test_loaded_model_runs_on_onednn_with_the_same_logits():
    source = resolve("tiny-random:verifier")
    ref = DecoderStack(load_model(source, "float32", linear_kernel="aten"))
    fast_model = load_model(source, "float32", linear_kernel="auto")
    assert not any(type(m) is nn.Linear for m in fast_model.modules())
    assert isinstance(fast_model.lm_head, kernels.OneDNNLinear)
    fast = DecoderStack(fast_model)
    assert fast.vocab_size == ref.vocab_size
    ids = list(range(3, 40))
    a, b = ref.new_cache(), fast.new_cache()
    torch.testing.assert_close(fast.forward(ids, b, 5), ref.forward(ids, a, 5), rtol=1e-4, atol=1e-4)
    # a block after the prompt, then a single step: the cache written by the oneDNN layers is the same
    torch.testing.assert_close(fast.forward([7, 8, 9], b, 3), ref.forward([7, 8, 9], a, 3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.forward([11], b, 1), ref.forward([11], a, 1), rtol=1e-4, atol=1e-4)


def test_float64_and_quantized_layers_keep_their_kernels():
    source = resolve("tiny-random:verifier")
    model = load_model(source, "float64", linear_kernel="auto")
    assert any(type(m) is nn.Linear for m in model.modules())
    quantized = load_model(source, "float32", precision="int8", linear_kernel="auto")
    assert not any(isinstance(m, kernels.OneDNNLinear) for m in quantized.modules())
