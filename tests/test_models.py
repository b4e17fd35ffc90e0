import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cfsp.errors import CfspError, UsageError
from cfsp.models import load_model
from tests.conftest import tiny_model


def _save(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_local_directory_roundtrip(tmp_path, tiny_tokenizer):
    model = tiny_model("llama-gqa")
    _save(model, tiny_tokenizer, tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    assert loaded.model.dtype == torch.float32
    assert load_model(str(tmp_path), dtype="bfloat16").model.dtype == torch.bfloat16


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="not found"):
        load_model("no-such-alias")
    with pytest.raises(UsageError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(UsageError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8")
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "x.gguf"))


def test_hub_id_without_hub_is_a_clear_error():
    with pytest.raises(UsageError, match="hub did not provide it"):
        load_model("someone/not-a-real-model-xyz")


def test_pickle_weights_are_refused(tmp_path, tiny_tokenizer):
    _save(tiny_model("llama-gqa"), tiny_tokenizer, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pickle files are never loaded"):
        load_model(str(tmp_path))


def test_truncated_safetensors(tmp_path, tiny_tokenizer):
    _save(tiny_model("llama-gqa"), tiny_tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CfspError, match="corrupt safetensors"):
        load_model(str(tmp_path))
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(CfspError, match="corrupt safetensors"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path, tiny_tokenizer):
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=128)
    _save(AutoModelForCausalLM.from_config(config), tiny_tokenizer, tmp_path)
    with pytest.raises(UsageError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_tokenizer_model_mismatch(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    _save(LlamaForCausalLM(config), tiny_tokenizer, tmp_path)
    with pytest.raises(CfspError, match="do not belong together"):
        load_model(str(tmp_path))
