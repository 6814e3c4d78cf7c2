"""What sftjax refuses to do with files it is given: unpickle weights, run code from a model folder,
or reach the network. Each test fails if the refusal goes away."""

import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from sftjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sftjax")
CHAT = os.path.join(ROOT, "tests", "data", "chat.jsonl")


def _sources() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(root, f)) as fh:
                    out[os.path.relpath(os.path.join(root, f), ROOT)] = fh.read()
    return out


def _model_copy(src: str, dst, skip=()) -> str:
    """A model folder linking to `src`'s files except `skip` (which the test writes itself)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f not in skip:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


# --- (a) weights only from safetensors and GGUF -------------------------------------------------

def test_pickle_weights_are_refused_without_unpickling(tiny_model_dir, tmp_path):
    from sftjax.io.load import load_pretrained

    model = _model_copy(tiny_model_dir, tmp_path / "torch-only", skip=("model.safetensors",))
    with open(os.path.join(model, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04junk, not a pickle")  # unpickling it would raise something else
    with pytest.raises(UserError, match=re.escape(f"{model}/pytorch_model.bin: PyTorch pickle weights are not "
                                                  "loaded") + ".*convert the folder to safetensors"):
        load_pretrained(model)


def test_no_pickle_loader_in_the_package():
    """No module that can unpickle is imported, and no loader is asked to allow pickles."""
    risky = {"pickle", "dill", "cloudpickle", "joblib", "torch", "shelve", "marshal"}
    for path, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not risky & set(names), (path, node.lineno, names)
        assert "allow_pickle=True" not in text, path


# --- (b) no code from model folders --------------------------------------------------------------

def test_trust_remote_code_is_never_true():
    """Every mention of trust_remote_code in the package is a `trust_remote_code=False` argument or
    text inside a string; nothing else (a variable, a True, a **kwargs dict key) is allowed."""
    mentions = 0
    for path, text in _sources().items():
        found = text.count("trust_remote_code")
        allowed = 0
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, (path, node.lineno)
                allowed += 1
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                allowed += node.value.count("trust_remote_code")
        assert found == allowed, f"{path}: trust_remote_code used other than as =False"
        mentions += found
    assert mentions >= 1  # the tokenizer load says it explicitly (see io/load.py)


def _evil_folder(tiny_model_dir, tmp_path, tokenizer_needs_code: bool) -> tuple[str, str]:
    """The tiny Llama folder plus evil.py, which writes a marker file when imported, named by
    auto_map in config.json and (if `tokenizer_needs_code`) as the only tokenizer in tokenizer_config.json."""
    folder = _model_copy(tiny_model_dir, tmp_path / "evil", skip=("config.json", "tokenizer_config.json"))
    marker = str(tmp_path / "IMPORTED")
    with open(os.path.join(folder, "evil.py"), "w") as f:
        f.write(f"open({marker!r}, 'w').write('evil.py was imported')\nEvilConfig = EvilModel = EvilTokenizer = object\n")
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                       "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(tiny_model_dir, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    if tokenizer_needs_code:
        tcfg.pop("tokenizer_class", None)
        tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f)
    return folder, marker


def test_auto_map_in_config_is_ignored(tiny_model_dir, tmp_path):
    """A Llama folder that also names custom code loads as the Llama it is, without importing it."""
    from sftjax.io.hf import read_hf_folder
    from sftjax.io.load import load_pretrained

    folder, marker = _evil_folder(tiny_model_dir, tmp_path, tokenizer_needs_code=False)
    cfg, params, tok = load_pretrained(folder)
    assert cfg.model_type == "llama" and len(tok) == 49152
    want = read_hf_folder(tiny_model_dir)[1]["model.embed_tokens.weight"]
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], want)
    assert not os.path.exists(marker)


def test_tokenizer_that_needs_custom_code_is_refused(tiny_model_dir, tmp_path):
    """In process and through the CLI: one clean error, no prompt, and the code never runs."""
    from sftjax.io.load import load_tokenizer

    folder, marker = _evil_folder(tiny_model_dir, tmp_path, tokenizer_needs_code=True)
    with pytest.raises(UserError, match="tokenizer needs custom code .*sftjax never runs code from a model folder"):
        load_tokenizer(folder)
    cfg = tmp_path / "c.py"
    cfg.write_text("from sftjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                   f"    c.model.path = {folder!r}\n    c.data.train = {CHAT!r}\n    return c\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "sftjax.cli", "data", "inspect", f"--config={cfg}"], env=env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"error: model.path: {folder}'s tokenizer needs custom code" in r.stderr
    assert not os.path.exists(marker)


# --- (c) no network at run time ------------------------------------------------------------------

NET_HOOK = '''
import atexit, json, os, socket

_log = os.environ["SFTJAX_TEST_NETLOG"]
_seen = []


def _refuse(what):
    _seen.append(what)
    raise OSError(101, "network is unreachable (test)")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect {address!r}")
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect_ex {address!r}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    _refuse(f"getaddrinfo {host!r}")


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo


@atexit.register
def _report():
    import sys

    hub = sys.modules.get("huggingface_hub.constants")
    with open(_log, "w") as f:
        json.dump({"attempts": _seen, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
                   "hub_offline": getattr(hub, "HF_HUB_OFFLINE", None)}, f)
'''


def test_training_run_makes_no_network_connection(tiny_model_dir, tmp_path):
    """A one-step `sftjax train` with every socket and DNS lookup to the outside refused and
    recorded, proxies pointed at a closed local port, no_proxy unset and HF_HUB_OFFLINE *not* set
    (the CLI sets it itself): the run succeeds, nothing tried the network, and the Hugging Face
    libraries ran offline."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NET_HOOK)
    cfg = tmp_path / "c.py"
    cfg.write_text("from sftjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                   f"    c.model.path = {tiny_model_dir!r}\n    c.data.train = {CHAT!r}\n    c.data.max_length = 64\n    c.data.buckets = 1\n"
                   "    c.data.eval_fraction = 0.0\n    c.train.steps = 1\n    c.train.batch_size = 8\n"
                   "    c.optim.warmup_steps = 0\n    c.checkpoint.every = 1\n    c.mesh.data = 1\n    return c\n")
    drop = {"XLA_FLAGS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "no_proxy", "NO_PROXY"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    dead = "http://127.0.0.1:9"
    env |= {"HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead, "ALL_PROXY": dead,
            "SFTJAX_TEST_NETLOG": str(tmp_path / "net.json"),  # JAX_PLATFORMS as given: backends probe too
            "PYTHONPATH": os.pathsep.join([str(hook), ROOT, env.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "sftjax.cli", "train", f"--config={cfg}", f"--workdir={tmp_path / 'w'}"],
                       env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path / "w" / "checkpoints")
    with open(tmp_path / "net.json") as f:
        report = json.load(f)
    assert report["attempts"] == [], report
    assert report["HF_HUB_OFFLINE"] == "1" and report["hub_offline"] is True, report
