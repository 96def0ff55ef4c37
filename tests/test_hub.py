"""Sharing on the Hub, end to end through the real huggingface_hub client against a local fake Hub (tests/fake_hub.py):
`hf-quant push` / `push_folder`, `hf_quant.push_to_hub`, transformers' `model.push_to_hub`, `optimum-cli hf-quant`,
download back into a Hub cache and load offline, the generated model card, and the errors for bad input.

A tiny random Llama (hidden 64, 2 layers, vocab 128) with a word-level tokenizer keeps it fast; subprocesses are
used only where a fresh interpreter is the point (environment-configured endpoint, offline load, optimum-cli).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from fake_hub import FakeHub
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hf_quant
from hf_quant import HfQuantConfig
from hf_quant.cli import main as cli_main
from hf_quant.eval.report import QualityResult, make_record
from hf_quant.eval.storage import checkpoint_storage, model_storage
from hf_quant.integrations.hub import EVAL_RECORD_FILENAME, HubPushError, push_folder, render_model_card

TOKEN = "hf_fake_write_token"
READ_TOKEN = "hf_fake_read_token"
BASE = "base-org/tiny-llama"  # served by the fake Hub with a card that has a license to copy
BASE_CARD = "---\nlicense: mit\npipeline_tag: text-generation\n---\n# tiny llama\n"
REPO = "hf-quant-tests/tiny-llama-int4"
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 3]])

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{f"w{i}": i for i in range(4, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   pad_token="[PAD]")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(quantized checkpoint dir with tokenizer, its logits on IDS, storage of the loaded model as `hf-quant eval`
    measures it)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    root = tmp_path_factory.mktemp("hub")
    LlamaForCausalLM(cfg).save_pretrained(root / "float")
    model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=HfQuantConfig(bits=4, group_size=32))
    model.save_pretrained(root / "quant")
    _tokenizer().save_pretrained(root / "quant")
    with torch.no_grad():
        logits = model(IDS).logits
    return root / "quant", logits, model_storage(model)


def _record(checkpoint, **quality) -> dict:
    """An `hf-quant eval` record of the checkpoint (its storage measured on the loaded model, as `hf-quant eval`
    does), with a made-up perplexity."""
    folder, _, storage = checkpoint
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    result = QualityResult(**{"metric": "perplexity", "dataset": "botchan", "tokens": 256, "float": 131.2468,
                              "quantized": 133.9753, **quality})
    return make_record(BASE, qc, storage, [result])


@pytest.fixture(scope="module")
def hub():
    with FakeHub(tokens=(TOKEN,), read_tokens=(READ_TOKEN,)) as server:
        server.add_repo(BASE, {"README.md": BASE_CARD.encode()})
        yield server


def _isolate(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """No token but the ones a test passes, a private Hub cache, and LFS instead of Xet (the fake Hub serves no Xet
    storage)."""
    mp.delenv("HF_TOKEN", raising=False)
    mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    mp.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp / "no-token"))
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hub-cache"))
    mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path)


def _listing(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def pushed(checkpoint, hub, tmp_path_factory):
    """The first push of the checkpoint with an eval record: (record, CommitInfo, the folder listing before it)."""
    quant_dir = checkpoint[0]
    record = _record(checkpoint)
    record_path = tmp_path_factory.mktemp("record") / "eval.json"
    record_path.write_text(json.dumps(record))
    before = _listing(quant_dir)
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, record_path.parent)
        info = push_folder(quant_dir, REPO, base_model=BASE, eval_record=record_path, token=TOKEN, endpoint=hub.url)
    return record, info, before


def test_push_uploads_checkpoint_tokenizer_card_and_record(checkpoint, hub, pushed):
    quant_dir = checkpoint[0]
    record, info, before = pushed
    remote = hub.files(REPO)
    local = {p.name: p.read_bytes() for p in quant_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= local.keys()
    for name, data in local.items():
        assert remote[name] == data, name
    assert json.loads(remote["config.json"])["quantization_config"]["quant_method"] == "hf_quant"
    assert json.loads(remote[EVAL_RECORD_FILENAME]) == record
    assert remote["README.md"].decode().startswith("---\n")
    # The weights went through LFS (one object), the small files inline in the commit.
    assert hub.count("PUT", r"^/lfs-upload/") == 1
    assert hub.repos[REPO].commits[info.oid]["model.safetensors"].lfs
    # The checkpoint folder was only read: no card or record written into it.
    assert _listing(quant_dir) == before


def test_repush_uploads_nothing_and_a_changed_card_only_itself(checkpoint, hub, pushed):
    quant_dir = checkpoint[0]
    record, info, _ = pushed
    record_path = quant_dir.parent / "same.json"
    record_path.write_text(json.dumps(record))
    n = len(hub.requests)
    again = push_folder(quant_dir, REPO, base_model=BASE, eval_record=record_path, token=TOKEN, endpoint=hub.url)
    assert again.oid == info.oid
    assert hub.count("POST", r"/commit/") == 1 and hub.count("PUT", r"^/lfs-upload/") == 1, hub.requests[n:]

    changed = _record(checkpoint, quantized=140.0)
    after = push_folder(quant_dir, REPO, base_model=BASE, eval_record=changed, token=TOKEN, endpoint=hub.url)
    assert after.oid != info.oid
    assert hub.count("PUT", r"^/lfs-upload/") == 1  # the weights were not sent again
    old, new = hub.repos[REPO].commits[info.oid], hub.repos[REPO].commits[after.oid]
    assert {p for p in new if new[p] != old.get(p)} == {"README.md", EVAL_RECORD_FILENAME}
    assert "| 140.00 |" in new["README.md"].data.decode()


def test_pushing_a_loaded_model_twice_uploads_nothing_the_second_time(checkpoint, hub):
    """`hf_quant.push_to_hub` saves afresh each time; safetensors writes metadata keys in random order, which the
    push puts back in order, so the second save is byte-identical and nothing is re-sent."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint[0])
    first = hf_quant.push_to_hub(model, "hf-quant-tests/twice", tokenizer=_tokenizer(), token=TOKEN, endpoint=hub.url)
    n = len(hub.requests)
    second = hf_quant.push_to_hub(model, "hf-quant-tests/twice", tokenizer=_tokenizer(), token=TOKEN, endpoint=hub.url)
    assert second.oid == first.oid
    assert not [r for r in hub.requests[n:] if r[0] == "PUT" or "/commit/" in r[1]], hub.requests[n:]
    remote = hub.files("hf-quant-tests/twice")
    (checkpoint[0].parent / "twice.safetensors").write_bytes(remote["model.safetensors"])
    with safe_open(checkpoint[0].parent / "twice.safetensors", framework="pt") as f:
        assert list(f.metadata()) and f.metadata() == safe_open(checkpoint[0] / "model.safetensors", "pt").metadata()
    reloaded = load_file(checkpoint[0].parent / "twice.safetensors")
    local = load_file(checkpoint[0] / "model.safetensors")
    assert reloaded.keys() == local.keys() and all(torch.equal(reloaded[k], local[k]) for k in local)


def test_push_to_a_branch_leaves_main_alone(checkpoint, hub, pushed):
    main = hub.repos[REPO].branches["main"]
    info = push_folder(checkpoint[0], REPO, revision="int4-g32", token=TOKEN, endpoint=hub.url)
    assert hub.repos[REPO].branches["main"] == main and hub.repos[REPO].branches["int4-g32"] == info.oid
    assert "## Quality" not in hub.files(REPO, "int4-g32")["README.md"].decode()  # no eval record this time
    assert hub.files(REPO, "int4-g32")["model.safetensors"] == (checkpoint[0] / "model.safetensors").read_bytes()


def test_pushed_repo_loads_offline_from_the_hub_cache_with_same_logits(checkpoint, hub, pushed, tmp_path):
    reference = checkpoint[1]
    cache = tmp_path / "cache"
    snapshot_download(REPO, endpoint=hub.url, cache_dir=cache)
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)  # as the reference (one_thread): the same reduction order, bit-identical logits
model = AutoModelForCausalLM.from_pretrained({REPO!r})
tokenizer = AutoTokenizer.from_pretrained({REPO!r})
assert tokenizer("w5 w9")["input_ids"][-2:] == [5, 9], tokenizer("w5 w9")
print(type(model.model.layers[0].mlp.down_proj).__name__)
with torch.no_grad():
    torch.save(model(torch.tensor({IDS.tolist()})).logits, {str(tmp_path / "logits.pt")!r})
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "QuantLinear"
    assert torch.equal(torch.load(tmp_path / "logits.pt"), reference)


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def test_card_metadata_and_figures_match_the_eval_record(hub, pushed):
    record, info, _ = pushed
    card = hub.repos[REPO].commits[info.oid]["README.md"].data.decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "mit"  # copied from the base model's card on the Hub
    assert meta["pipeline_tag"] == "text-generation"
    assert {"hf_quant", "quantized", "int4", "4-bit"} <= set(meta["tags"])
    # Botchan is no Hub dataset: no model-index entry claims one; the card names the text and where it comes from
    assert "model-index" not in meta and "dataset" not in card.split("---")[1]
    assert "Botchan (Natsume" in card and "`test/botchan.txt` in its source distribution" in card

    s = record["storage"]
    assert f"| bits per weight, quantized layers | {s['quantized_bits_per_weight']:.3f} " in card
    assert f"| bits per weight, whole model | {s['bits_per_weight']:.3f} " in card
    assert f"{s['bytes_before']:,} bytes" in card and f"{s['bytes_after']:,} bytes" in card
    q = record["quality"][0]
    change = 100 * (q["quantized"] - q["float"]) / q["float"]
    assert f"| perplexity | botchan | 256 | {q['float']:.2f} | {q['quantized']:.2f} | {change:+.2f}% |" in card
    assert f'from_pretrained("{REPO}")' in card and "import hf_quant" in card
    assert "hf_quant 0.1.0" in card.replace('"hf-quant==0.1.0"', "")
    # The modules table covers every quantized module, at the bits per weight the record gives.
    (row,) = [line for line in card.splitlines() if "`q_proj`" in line]
    assert row.split("|")[2].strip() == str(len(s["modules"]) - 1)  # all but the default 8-bit head, its own row
    (head_row,) = [line for line in card.splitlines() if "`lm_head`" in line and "int8" in line]
    assert head_row.split("|")[2].strip() == "1"
    assert f"{s['modules']['model.layers.0.self_attn.q_proj']['bits_per_weight']:.3f}" in row


def test_card_without_record_uses_the_checkpoint_and_a_local_base_model(checkpoint, tmp_path):
    quant_dir = checkpoint[0]
    # A base model given as a Hub cache snapshot folder: its repo id comes from the path, its license from its card.
    snapshot = tmp_path / "models--base-org--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n")
    card = render_model_card(quant_dir, repo_id="me/tiny", base_model=snapshot)
    meta = _front_matter(card)
    assert meta["base_model"] == BASE
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert "model-index" not in meta and "## Quality" not in card
    storage = checkpoint_storage(quant_dir)
    assert f"| bits per weight, quantized layers | {storage.bits_per_weight:.3f} " in card
    assert f"{storage.total_bytes:,} bytes" in card and f"{storage.bytes_before:,} bytes" in card
    # An explicit license wins; a plain local folder links no base model.
    plain = tmp_path / "plain"
    plain.mkdir()
    meta = _front_matter(render_model_card(quant_dir, repo_id="me/tiny", base_model=plain, license="apache-2.0"))
    assert meta["license"] == "apache-2.0" and "base_model" not in meta and "base_model_relation" not in meta


def test_eval_record_of_another_checkpoint_is_refused(checkpoint, hub):
    quant_dir = checkpoint[0]
    record = _record(checkpoint)
    record["quantization_config"]["group_size"] = 128
    n = len(hub.requests)
    with pytest.raises(HubPushError, match=r"another quantization \(group_size differ"):
        push_folder(quant_dir, REPO, eval_record=record, token=TOKEN, endpoint=hub.url)
    record = _record(checkpoint)
    record["storage"]["bytes_after"] += 1
    with pytest.raises(HubPushError, match="run `hf-quant eval` on this checkpoint"):
        push_folder(quant_dir, REPO, eval_record=record, token=TOKEN, endpoint=hub.url)
    assert len(hub.requests) == n


@pytest.mark.parametrize("repo_id", ["org/name/extra", "org/has space", "org/-name", "org/name.", "org/a--b"])
def test_bad_repo_ids_are_refused_before_any_work(checkpoint, hub, repo_id, capsys):
    quant_dir = checkpoint[0]
    n = len(hub.requests)
    with pytest.raises(HubPushError, match="invalid repo id .* Use 'your-name/model-name'"):
        push_folder(quant_dir, repo_id, token=TOKEN, endpoint=hub.url)
    assert cli_main(["push", str(quant_dir), repo_id, "--token", TOKEN]) == 2
    assert "error: invalid repo id" in capsys.readouterr().err
    assert len(hub.requests) == n


def test_auth_failures_name_the_fix_and_leave_nothing_behind(checkpoint, hub):
    quant_dir = checkpoint[0]
    before = _listing(quant_dir)
    commits = hub.count("POST", r"/commit/")
    for repo_id in (REPO, "hf-quant-tests/new-repo"):  # existing and new repository
        with pytest.raises(HubPushError, match=r"rejected the credentials .* \(HTTP 401\): log in with `hf auth login`"):
            push_folder(quant_dir, repo_id, token="hf_wrong", endpoint=hub.url)
        with pytest.raises(HubPushError, match="no Hugging Face token found .* `hf auth login`, or set HF_TOKEN"):
            push_folder(quant_dir, repo_id, endpoint=hub.url)
    with pytest.raises(HubPushError, match=r"refused writing .* \(HTTP 403\): use a token with write access to "
                                           "'hf-quant-tests', or push to a repo id in your own namespace"):
        push_folder(quant_dir, "hf-quant-tests/new-repo", token=READ_TOKEN, endpoint=hub.url)
    with pytest.raises(HubPushError, match="cannot reach http://127.0.0.1:9 .* check the network or HF_ENDPOINT"):
        push_folder(quant_dir, "hf-quant-tests/new-repo", token=TOKEN, endpoint="http://127.0.0.1:9")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set; unset it to upload"):
            push_folder(quant_dir, "hf-quant-tests/new-repo", token=TOKEN, endpoint=hub.url)
    assert "hf-quant-tests/new-repo" not in hub.repos
    assert hub.count("POST", r"/commit/") == commits
    assert _listing(quant_dir) == before


def test_folders_that_are_not_hf_quant_checkpoints_are_refused(checkpoint, tmp_path):
    with pytest.raises(HubPushError, match="config.json not found"):
        push_folder(tmp_path, REPO, token=TOKEN)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HubPushError, match="no hf_quant quantization_config"):
        push_folder(tmp_path, REPO, token=TOKEN)


def _env(hub: FakeHub, tmp_path: Path) -> dict:
    return dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "home"),
                HF_HUB_CACHE=str(tmp_path / "cache"))


def test_transformers_push_to_hub_and_hf_quant_push_to_hub(checkpoint, hub, tmp_path):
    """transformers' own `model.push_to_hub` uploads the packed checkpoint; `hf_quant.push_to_hub` adds the card, and
    a later `model.push_to_hub` to that repository keeps it."""
    quant_dir = checkpoint[0]
    code = f"""
import hf_quant
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(quant_dir)!r})
model.push_to_hub("hf-quant-tests/via-transformers")
info = hf_quant.push_to_hub(model, "hf-quant-tests/via-hf-quant", tokenizer=AutoTokenizer.from_pretrained({str(quant_dir)!r}))
model.push_to_hub("hf-quant-tests/via-hf-quant")
print("hf_quant commit", info.oid)
"""
    run = subprocess.run([sys.executable, "-c", code], env=_env(hub, tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    local = load_file(quant_dir / "model.safetensors")
    for repo_id in ("hf-quant-tests/via-transformers", "hf-quant-tests/via-hf-quant"):
        files = hub.files(repo_id)
        (tmp_path / "remote.safetensors").write_bytes(files["model.safetensors"])
        remote = load_file(tmp_path / "remote.safetensors")
        assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
        assert json.loads(files["config.json"])["quantization_config"] == \
            json.loads((quant_dir / "config.json").read_text())["quantization_config"]
    assert "tokenizer.json" in hub.files("hf-quant-tests/via-hf-quant")
    card = hub.files("hf-quant-tests/via-hf-quant")["README.md"].decode()
    assert "## Size" in card and _front_matter(card)["library_name"] == "transformers"
    # transformers' push re-sends model.safetensors: its fresh save differs in header key order (safetensors #584),
    # which hf_quant.push_to_hub puts back in order; the tensors are the same (checked above).
    repo = hub.repos["hf-quant-tests/via-hf-quant"]
    ours, theirs = repo.commits[run.stdout.split()[-1]], repo.commits[repo.branches["main"]]
    assert {p for p in theirs if theirs[p] != ours.get(p)} <= {"README.md", "model.safetensors"}


def test_optimum_cli_help_and_push(checkpoint, hub, tmp_path):
    quant_dir = checkpoint[0]
    env = _env(hub, tmp_path)
    script = Path(sys.executable).with_name("optimum-cli")  # the console script `pip install optimum` creates
    cli = [str(script) if script.exists() else "optimum-cli", "hf-quant"]
    run = subprocess.run(cli + ["--help"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"\{quantize,inspect,.*push.*\}", run.stdout), run.stdout
    push = cli + ["push", str(quant_dir), "hf-quant-tests/via-optimum", "--base-model", BASE]
    run = subprocess.run(push, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pushed" in run.stdout
    files = hub.files("hf-quant-tests/via-optimum")
    assert files["model.safetensors"] == (quant_dir / "model.safetensors").read_bytes()
    assert _front_matter(files["README.md"].decode())["license"] == "mit"


def test_optimum_cli_command_exits_with_the_hf_quant_status(checkpoint, capsys):
    """The optimum command tree as optimum-cli builds it; a failing subcommand exits with hf-quant's status."""
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    from hf_quant.optimum_cli import HfQuantCommand

    root = RootOptimumCLICommand("optimum-cli")
    register_optimum_cli_subcommand(HfQuantCommand, parent_command=root)
    args = root.parser.parse_args(["hf-quant", "push", str(checkpoint[0]), "a/b/c"])
    with pytest.raises(SystemExit) as exit_info:
        args.func(args).run()
    assert exit_info.value.code == 2
    assert "error: invalid repo id 'a/b/c'" in capsys.readouterr().err
