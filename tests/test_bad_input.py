"""Damaged or inconsistent checkpoints give a clear error naming the file or tensor and the fix; nothing is
silently skipped, and pickles are never loaded by hf_quant."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.model.checkpoint import (
    METADATA_VERSION_KEY,
    CheckpointError,
    check_model_packed_values,
    check_packed_values,
    records_digest,
    tensor_digest,
)

ST = "model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(root / "float")
    model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=HfQuantConfig(group_size=32))
    model.save_pretrained(root / "quant")
    return {"float": root / "float", "quant": root / "quant"}


@pytest.fixture
def quant_dir(saved, tmp_path) -> Path:
    """A private copy of the saved quantized checkpoint, free to tamper with."""
    return Path(shutil.copytree(saved["quant"], tmp_path / "quant"))


@pytest.fixture
def float_dir(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved["float"], tmp_path / "float"))


def rewrite(path: Path, edit, redigest: bool = True) -> None:
    """Load a safetensors file, let `edit(tensors, metadata)` change it, and write it back (metadata kept). With
    `redigest`, the recorded SHA-256 of every module is recomputed, as a deliberate tamperer would: what is tested
    is then the check after the digest."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(path))
    edit(tensors, metadata)
    if redigest and "hf_quant_modules" in metadata:
        records = json.loads(metadata["hf_quant_modules"])
        for name, record in records.items():
            own = {k[len(name) + 1:]: t for k, t in tensors.items()
                   if k.startswith(name + ".") and "." not in k[len(name) + 1:] and k[len(name) + 1:] != "bias"}
            if isinstance(record, dict) and "sha256" in record and own:
                record["sha256"] = tensor_digest(own)
        metadata["hf_quant_modules"] = json.dumps(records)
        config_path = path.parent / "config.json"
        if config_path.exists() and "hf_quant_float_tensors" in metadata:  # and the link config.json carries
            config = json.loads(config_path.read_text())
            config["quantization_config"]["weights_digest"] = records_digest(
                json.loads(metadata["hf_quant_config"]), records, json.loads(metadata["hf_quant_float_tensors"]))
            config_path.write_text(json.dumps(config))
    save_file(tensors, str(path), metadata=metadata)


def edit_quantization_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def test_intact_checkpoint_loads(quant_dir):
    model = AutoModelForCausalLM.from_pretrained(quant_dir)
    assert isinstance(model.get_submodule(Q_PROJ), QuantLinear)
    check_model_packed_values(model)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# --- damaged files -------------------------------------------------------------------------------


def test_truncated_file_names_the_file(quant_dir):
    path = quant_dir / ST
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    message = str(info.value)
    assert str(path) in message
    assert "truncated" in message or "corrupted" in message
    assert "save the checkpoint again" in message


@pytest.mark.parametrize(
    "tensor,change,found",
    [
        ("qweight", lambda t: t.to(torch.int32), "torch.int32 [64, 32]"),
        ("qweight", lambda t: t[:, :-1].contiguous(), "torch.uint8 [64, 31]"),
        ("scales", lambda t: t.float(), "torch.float32 [64, 2]"),
        ("zeros", lambda t: t[:-1].contiguous(), "torch.float16 [63, 2]"),
    ],
    ids=["qweight-dtype", "qweight-shape", "scales-dtype", "zeros-shape"],
)
def test_tampered_tensor_names_key_expected_and_found(quant_dir, tensor, change, found):
    key = f"{Q_PROJ}.{tensor}"
    rewrite(quant_dir / ST, lambda tensors, meta: tensors.__setitem__(key, change(tensors[key])))
    expected = {"qweight": "torch.uint8 [64, 32]", "scales": "torch.float16 [64, 2]", "zeros": "torch.float16 [64, 2]"}
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    message = str(info.value)
    assert repr(key) in message and ST in message
    assert f"is {found}" in message
    assert f"requires {expected[tensor]}" in message


def test_missing_tensor_names_the_key(quant_dir):
    key = f"{Q_PROJ}.scales"
    rewrite(quant_dir / ST, lambda tensors, meta: tensors.pop(key))
    with pytest.raises(CheckpointError, match="missing tensor") as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    assert repr(key) in str(info.value) and ST in str(info.value)


def test_packed_tensor_of_a_module_the_config_keeps_in_float(quant_dir):
    # config.json edited to keep q_proj in float: its packed tensors would be dropped and its float weight
    # randomly initialised; instead the mismatch is reported.
    edit_quantization_config(quant_dir, lambda qc: qc["modules_to_not_convert"].append(Q_PROJ))
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    assert repr(f"{Q_PROJ}.qweight") in str(info.value) and "in float" in str(info.value)


def test_float_weight_beside_packed_tensors(quant_dir):
    key = f"{Q_PROJ}.weight"
    rewrite(quant_dir / ST, lambda tensors, meta: tensors.__setitem__(key, torch.zeros(64, 64)))
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    assert repr(key) in str(info.value)


# --- format versions -----------------------------------------------------------------------------


def test_config_format_version_from_the_future(quant_dir):
    edit_quantization_config(quant_dir, lambda qc: qc.__setitem__("format_version", 99))
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    message = str(info.value)
    assert "format_version=99" in message and "upgrade hf_quant" in message


def test_metadata_format_version_from_the_future(quant_dir):
    rewrite(quant_dir / ST, lambda tensors, meta: meta.__setitem__(METADATA_VERSION_KEY, "99"))
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    message = str(info.value)
    assert str(quant_dir / ST) in message and "version 99" in message and "Upgrade hf_quant" in message


def test_metadata_format_version_garbage(quant_dir):
    rewrite(quant_dir / ST, lambda tensors, meta: meta.__setitem__(METADATA_VERSION_KEY, "one"))
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    assert METADATA_VERSION_KEY in str(info.value) and "'one'" in str(info.value)


def test_config_without_format_version(quant_dir):
    edit_quantization_config(quant_dir, lambda qc: qc.pop("format_version"))
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    message = str(info.value)
    assert "no 'format_version'" in message and "save the checkpoint again" in message


# --- pickles -------------------------------------------------------------------------------------


def _bin_only(quant_dir: Path) -> Path:
    tensors = load_file(str(quant_dir / ST))
    (quant_dir / ST).unlink()
    torch.save(tensors, quant_dir / "pytorch_model.bin")
    return quant_dir / "pytorch_model.bin"


def test_pickle_checkpoint_is_refused_unopened(quant_dir, monkeypatch):
    path = _bin_only(quant_dir)

    def no_unpickling(*args, **kwargs):
        raise AssertionError(f"torch.load called on {args[:1]}")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    message = str(info.value)
    assert str(path) in message and "safetensors only" in message and "never loaded" in message


def test_pickle_checkpoint_without_dtype_in_config(quant_dir, monkeypatch):
    # Without `dtype` in config.json, transformers itself reads the .bin (torch.load, weights_only=True, on the
    # meta device) to guess the dtype, before any hf_quant hook runs. hf_quant must not add a load of its own, and
    # the checkpoint is still refused.
    path = _bin_only(quant_dir)
    config = json.loads((quant_dir / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (quant_dir / "config.json").write_text(json.dumps(config))
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        import traceback

        calls.append((kwargs.get("weights_only"), "".join(traceback.format_stack())))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with pytest.raises(CheckpointError, match="safetensors only") as info:
        AutoModelForCausalLM.from_pretrained(quant_dir)
    assert str(path) in str(info.value)
    for weights_only, stack in calls:
        assert weights_only is True
        assert "hf_quant" not in stack.replace("test_bad_input", "")


# --- values --------------------------------------------------------------------------------------


def _nan_in_float_checkpoint(float_dir: Path, key: str) -> None:
    def edit(tensors, meta):
        tensors[key][3, 5] = float("nan")

    rewrite(float_dir / ST, edit)


def test_nan_weight_when_quantizing_on_load_is_not_silently_skipped(float_dir, caplog):
    """Loading fails and the weight is reported (in the exception or transformers' load report)."""
    key = "model.layers.0.self_attn.k_proj.weight"
    _nan_in_float_checkpoint(float_dir, key)
    with caplog.at_level(logging.WARNING), pytest.raises((RuntimeError, ValueError)) as info:
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=HfQuantConfig(group_size=32))
    reported = str(info.value) + caplog.text
    assert key in reported and "NaN" in reported


def test_nan_weight_when_quantizing_on_load_raises_value_error_naming_it(float_dir):
    key = "model.layers.0.self_attn.k_proj.weight"
    _nan_in_float_checkpoint(float_dir, key)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=HfQuantConfig(group_size=32))
    assert key in str(info.value) and "NaN" in str(info.value)


BAD_VALUES = [0.0, -0.5, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("value", BAD_VALUES, ids=["zero", "negative", "inf", "-inf", "nan"])
def test_invalid_scale_in_saved_file_names_the_tensor(quant_dir, value):
    key = f"{Q_PROJ}.scales"

    def edit(tensors, meta):
        tensors[key][5, 1] = value

    rewrite(quant_dir / ST, edit)
    # The header is valid, so the tensors load; the value check (meant to run in the quantizer after loading,
    # see check_model_packed_values) names the tensor and the index.
    with pytest.raises(CheckpointError) as info:
        model = AutoModelForCausalLM.from_pretrained(quant_dir)
        check_model_packed_values(model)
    message = str(info.value)
    assert repr(key) in message and "[5, 1]" in message and "finite and > 0" in message


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_invalid_zero_point_names_the_tensor(quant_dir, value):
    key = f"{Q_PROJ}.zeros"

    def edit(tensors, meta):
        tensors[key][0, 0] = value

    rewrite(quant_dir / ST, edit)
    with pytest.raises(CheckpointError) as info:
        model = AutoModelForCausalLM.from_pretrained(quant_dir)
        check_model_packed_values(model)
    assert repr(key) in str(info.value) and "finite" in str(info.value)


def test_double_quant_scale_metadata_checked():
    from hf_quant.formats import QuantScheme

    lin = torch.nn.Linear(64, 16, bias=False)
    q = QuantLinear.from_float(lin, QuantScheme(group_size=32, double_quant=True))
    check_packed_values(q, "layer")  # a freshly quantized layer passes
    q.scales_dq[0, 0] = 0.0  # step of the first block
    with pytest.raises(CheckpointError, match=r"'layer\.scales_dq'.*positive step"):
        check_packed_values(q, "layer")
    q.scales_dq[0, 0] = 1.0
    q.scales_dq[0, 1] = -2.0  # offset: decoded scales become negative
    with pytest.raises(CheckpointError, match=r"'layer\.scales'.*finite and > 0"):
        check_packed_values(q, "layer")
    q.scales_dq[0, 1] = float("inf")
    with pytest.raises(CheckpointError, match=r"'layer\.scales_dq'.*finite"):
        check_packed_values(q, "layer")


@pytest.mark.parametrize(
    "scheme",
    [
        dict(bits=4), dict(bits=2, symmetric=True), dict(bits=8, double_quant=True), dict(format="nf4"),
        dict(format="fp4", double_quant=True), dict(format="fp8", bits=8, group_size=-1), dict(bits=3, method="rtn"),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_value_check_accepts_what_hf_quant_writes(scheme):
    from hf_quant.formats import QuantScheme

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 24, bias=False)
    with torch.no_grad():
        lin.weight[:4] = 0.0  # all-zero groups: the smallest scales hf_quant writes
        lin.weight[4:8] *= 1e-6
    check_packed_values(QuantLinear.from_float(lin, QuantScheme(**{"group_size": 32, **scheme})))


# --- the weights' own record wins over config.json (issue: safe artifacts) ------------------------------------------


@pytest.fixture(scope="module")
def saved_formats(saved, tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of the formats whose config edits used to load silently wrong."""
    root = tmp_path_factory.mktemp("formats")
    settings = {
        "nf4": dict(format="nf4", group_size=32),
        "int4-sym": dict(bits=4, symmetric=True, group_size=32),
        "outliers": dict(bits=3, group_size=32, outliers_per_row=2),
        "lowrank": dict(bits=2, group_size=32, lowrank_rank=4),
        "vq": dict(format="vq", group_size=32),
        "ternary": dict(format="ternary", group_size=32),
        "hadamard": dict(bits=4, group_size=32, rotation="hadamard"),
    }
    out = {}
    for name, kwargs in settings.items():
        model = AutoModelForCausalLM.from_pretrained(saved["float"], quantization_config=HfQuantConfig(**kwargs))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def copy_of(saved_formats, name, tmp_path) -> Path:
    return Path(shutil.copytree(saved_formats[name], tmp_path / name))


@pytest.mark.parametrize("name,edit,named", [
    ("nf4", lambda qc: qc.update(format="fp4"), "'format': 'nf4'"),  # same tensors, other codebook
    ("int4-sym", lambda qc: qc.update(format="fp4", bits=4, symmetric=False), "'format': 'int'"),
    ("quant", lambda qc: qc.update(symmetric=True), "'symmetric': False"),  # asymmetric weights read as symmetric
    ("outliers", lambda qc: qc.update(outliers_per_row=0), "'outliers_per_row': 2"),  # outliers dropped
    ("hadamard", lambda qc: qc.update(rotation=None), "rotation"),  # rotation removed
    ("hadamard", lambda qc: qc.update(rotation_seed=1), "rotation_seed"),  # another rotation
    ("quant", lambda qc: qc.update(rotation="hadamard"), "rotation"),  # rotation added
])
def test_config_edits_that_loaded_silently_wrong_are_refused(saved, saved_formats, tmp_path, name, edit, named):
    folder = Path(shutil.copytree(saved["quant"], tmp_path / "q")) if name == "quant" else copy_of(
        saved_formats, name, tmp_path)
    edit_quantization_config(folder, edit)
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    message = str(info.value)
    assert named in message and "restore" in message.lower(), message


def test_every_format_reloads_through_the_record_checks(saved_formats):
    for name, folder in saved_formats.items():
        model = AutoModelForCausalLM.from_pretrained(folder)  # runs every record, digest and value check
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 + 1, name  # + the default 8-bit head
        check_model_packed_values(model)


@pytest.mark.parametrize("name,edit,unexpected", [
    ("quant", lambda qc: qc.update(symmetric=True), "zeros"),
    ("outliers", lambda qc: qc.update(outliers_per_row=0), "outlier_cols"),
])
def test_without_module_records_unexpected_tensors_are_refused(saved, saved_formats, tmp_path, name, edit, unexpected):
    """Checkpoints written before the records: a tensor the config does not expect is an error, not dropped."""
    folder = Path(shutil.copytree(saved["quant"], tmp_path / "q")) if name == "quant" else copy_of(
        saved_formats, name, tmp_path)
    rewrite(folder / ST, lambda tensors, meta: [meta.pop(k) for k in ("hf_quant_modules", "hf_quant_config")])
    edit_quantization_config(folder, edit)
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert repr(f"{Q_PROJ}.{unexpected}") in str(info.value), str(info.value)


def test_new_config_beside_old_weights_is_refused(saved, tmp_path):
    """What an interrupted save leaves: transformers writes config.json first, so a save of other settings killed
    before its weights leaves the new config beside the old weights."""
    folder = Path(shutil.copytree(saved["quant"], tmp_path / "q"))
    other = AutoModelForCausalLM.from_pretrained(saved["float"], quantization_config=HfQuantConfig(bits=3, group_size=32))
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_shards_of_different_saves_are_refused(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved["float"], quantization_config=HfQuantConfig(group_size=32))
    model.save_pretrained(tmp_path / "a", max_shard_size="20KB")
    other = AutoModelForCausalLM.from_pretrained(
        saved["float"], quantization_config=HfQuantConfig(group_size=32, overrides={"down_proj": {"method": "rtn"}}))
    other.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "b").glob("model-*.safetensors"))
    shutil.copy(tmp_path / "b" / shards[-1], tmp_path / "a" / shards[-1])  # one shard from another save
    with pytest.raises(CheckpointError, match="different saves"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def tamper(folder: Path, key: str, change) -> None:
    def edit(tensors, meta):
        tensors[key] = change(tensors[key].clone())

    rewrite(folder / ST, edit)


def set_first(value):
    def change(t):
        t.view(-1)[0] = value
        return t
    return change


@pytest.mark.parametrize("name,tensor,change,what", [
    ("vq", "codebook", set_first(math.nan), "finite"),
    ("vq", "scales", set_first(1e-7), "normal float16"),  # subnormal
    ("outliers", "outlier_values", set_first(math.inf), "finite"),
    ("outliers", "outlier_cols", set_first(-1), "column indices in [0, 64)"),  # wrapped to a valid column before
    ("outliers", "outlier_cols", set_first(64), "column indices in [0, 64)"),  # IndexError at the first forward before
    ("outliers", "outlier_cols", lambda t: t.flip(-1).contiguous(), "ascending"),
    ("lowrank", "lowrank_u", set_first(math.nan), "finite"),
    ("lowrank", "lowrank_v", set_first(-math.inf), "finite"),
    ("ternary", "qweight", set_first(243), "< 243"),  # failed only at the first forward before
    ("quant", "scales", set_first(1e-7), "normal float16"),
])
def test_invalid_stored_values_are_refused_at_load(saved, saved_formats, tmp_path, name, tensor, change, what):
    folder = Path(shutil.copytree(saved["quant"], tmp_path / "q")) if name == "quant" else copy_of(
        saved_formats, name, tmp_path)
    key = f"{Q_PROJ}.{tensor}"
    tamper(folder, key, change)
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert repr(key) in str(info.value) and what in str(info.value), str(info.value)


@pytest.mark.parametrize("tensor", ["qweight", "scales", "zeros"])
def test_a_changed_byte_that_is_still_a_valid_value_is_refused(quant_dir, tensor):
    """A flipped code byte (or a scale changed to another valid scale) passes every range check: the SHA-256 the
    save recorded for the module catches it."""
    key = f"{Q_PROJ}.{tensor}"

    def edit(tensors, meta):
        t = tensors[key].view(torch.uint8).view(-1)
        t[3] ^= 0x01

    rewrite(quant_dir / ST, edit, redigest=False)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*not the bytes saved"):
        AutoModelForCausalLM.from_pretrained(quant_dir)


def save_with_full_disk(monkeypatch, save) -> None:
    """Run `save` with the weight writes failing as on a full disk (after transformers wrote config.json)."""
    import transformers.modeling_utils as modeling_utils

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(modeling_utils, "safe_save_file", disk_full)
        with pytest.raises(OSError, match="No space"):
            save()


def test_atomic_save_leaves_the_previous_checkpoint_when_it_fails(saved, tmp_path, monkeypatch):
    from hf_quant.model.checkpoint import save_pretrained_atomic

    target = Path(shutil.copytree(saved["quant"], tmp_path / "ckpt"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = AutoModelForCausalLM.from_pretrained(saved["float"], quantization_config=HfQuantConfig(bits=3, group_size=32))
    save_with_full_disk(monkeypatch, lambda: save_pretrained_atomic(other, target))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left
    AutoModelForCausalLM.from_pretrained(target)  # still the previous checkpoint, loadable

    (target / "stale-extra.safetensors").write_bytes(b"x")
    save_pretrained_atomic(other, target, max_shard_size="20KB")  # sharded over a single-file checkpoint
    assert not (target / ST).exists() and not (target / "stale-extra.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert {m.scheme.bits for m in reloaded.model.modules() if isinstance(m, QuantLinear)} == {3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def other_float(folder: Path) -> None:
    """The tiny model with other weights (same architecture)."""
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(folder)


@pytest.mark.parametrize("first_sharded", [False, True])
def test_stale_weight_files_of_an_earlier_save_never_load_silently(saved, tmp_path, first_sharded):
    """Saving single-file over a sharded save (or sharded over a single file) leaves the earlier files beside the
    new ones; whichever transformers picks, the result is the latest save or a refusal, never the stale weights
    under the new config (same settings, other weights: only config.json's weights_digest tells them apart)."""
    folder = tmp_path / "q"
    first = AutoModelForCausalLM.from_pretrained(saved["float"], quantization_config=HfQuantConfig(group_size=32))
    other_float(tmp_path / "float2")  # other weights, same architecture and settings
    latest = AutoModelForCausalLM.from_pretrained(tmp_path / "float2", quantization_config=HfQuantConfig(group_size=32))
    first_kw, latest_kw = ({"max_shard_size": "20KB"}, {}) if first_sharded else ({}, {"max_shard_size": "20KB"})
    first.save_pretrained(folder, **first_kw)
    latest.save_pretrained(folder, **latest_kw)  # hf_quant's atomic save replaces the folder whole
    assert (folder / ST).exists() != (folder / "model.safetensors.index.json").exists()
    # transformers' own (non-atomic) save, as any other tool writing into the folder would, leaves both
    type(first).save_pretrained(first, folder, **first_kw)
    type(latest).save_pretrained(latest, folder, **latest_kw)
    assert (folder / ST).exists() and (folder / "model.safetensors.index.json").exists()
    ids = torch.tensor([[1, 5, 9, 77]])
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    except CheckpointError as e:
        assert "config.json was saved with other weights" in str(e)
        return
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, latest(ids).logits)


def test_config_beside_weights_of_the_same_settings_from_another_save_is_refused(saved, tmp_path):
    folder = Path(shutil.copytree(saved["quant"], tmp_path / "q"))
    other_float(tmp_path / "float2")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "float2", quantization_config=HfQuantConfig(group_size=32))
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "config.json", folder / "config.json")  # same settings, other weights
    with pytest.raises(CheckpointError, match="config.json was saved with other weights"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_plain_save_pretrained_of_an_hf_quant_model_is_atomic(saved, tmp_path, monkeypatch):
    """What the probe did: a save that fails after config.json is written (disk full) used to leave the new config
    beside the old weights. model.save_pretrained of a model hf_quant loaded now leaves the previous checkpoint."""
    target = Path(shutil.copytree(saved["quant"], tmp_path / "ckpt"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = AutoModelForCausalLM.from_pretrained(saved["float"], quantization_config=HfQuantConfig(bits=3, group_size=32))
    save_with_full_disk(monkeypatch, lambda: other.save_pretrained(target))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    other.save_pretrained(target)
    assert {m.scheme.bits for m in AutoModelForCausalLM.from_pretrained(target).model.modules()
            if isinstance(m, QuantLinear)} == {3}


_SAVE_LOOP = """
import sys, torch
from transformers import AutoModelForCausalLM
from hf_quant import HfQuantConfig
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=HfQuantConfig(bits=3, group_size=32))
print("ready", flush=True)
for i in range(100000):
    model.save_pretrained(sys.argv[2], max_shard_size="20KB" if i % 2 else None)
"""


def test_a_save_killed_part_way_leaves_a_loadable_checkpoint(saved, tmp_path):
    """The probe's case: SIGKILL 0.01-0.1 s into save_pretrained (4 of 4 kills used to leave a checkpoint that
    loaded wrong). Each kill must leave a checkpoint that loads: the previous one or the new one, whole."""
    import random
    import signal
    import subprocess
    import sys
    import time

    target = Path(shutil.copytree(saved["quant"], tmp_path / "ckpt"))
    rng = random.Random(0)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(saved["float"]), str(target)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.01, 0.1))
        child.send_signal(signal.SIGKILL)
        child.wait()
        model = AutoModelForCausalLM.from_pretrained(target)
        assert {m.scheme.bits for m in model.model.modules() if isinstance(m, QuantLinear)} in ({3}, {4})


@pytest.mark.parametrize("where", [0, 999, 4096 * 3 - 1])
def test_non_finite_value_found_in_any_slice(where):
    """The NaN/Inf check of data-free rounding runs a slice of rows at a time (bounded memory): a bad value in the
    first, a middle or the last slice (rows of 13 values, slices of 4096 / 13 rows) is found, and a weight with none
    passes."""
    from hf_quant.formats.packing import all_finite

    w = torch.randn(4096 * 3 // 13 + 1, 13).to(torch.bfloat16)
    assert all_finite(w, chunk_elements=4096)
    for bad in (float("nan"), float("inf"), -float("inf")):
        v = w.clone().reshape(-1)
        v[min(where, v.numel() - 1)] = bad
        assert not all_finite(v.reshape(w.shape), chunk_elements=4096), (where, bad)
    assert all_finite(torch.tensor(1.0)) and not all_finite(torch.tensor(float("nan")))
