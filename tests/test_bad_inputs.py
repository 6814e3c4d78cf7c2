"""The bad-input catalogue: every mistake a user can make with data, config, model, mesh or paths ends
the CLI with exit status 2 and exactly one `error: ...` line naming the file:line, the field or the
config key, never a traceback, and leaves an existing workdir's files (its checkpoints above all)
byte-for-byte as they were.

Each case runs the CLI's `main` in a subprocess on one CPU device (eight where the case is about the
mesh), against a copy of one workdir trained for a step here (once for both xdist workers). The
subprocess runs as sftjax is installed for users, without PyTorch (a test-only dependency here):
transformers then does not import it, which halves each case's start-up.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")
CHAT = os.path.join(DATA, "chat.jsonl")
# `python -m sftjax.cli ARGS` without PyTorch (a None entry in sys.modules: transformers sees no torch).
CLI = "import sys; sys.modules['torch'] = None; from sftjax.cli import main; sys.exit(main(sys.argv[1:]))"
REPLY = '{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}\n'


def _write_config(path, model_dir: str, extra: str = "") -> str:
    path.write_text(
        "from sftjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.model.path = {model_dir!r}\n    c.data.train = {CHAT!r}\n    c.data.max_length = 64\n    c.data.buckets = 1\n"
        "    c.data.eval_fraction = 0.0\n    c.train.steps = 1\n    c.train.batch_size = 8\n"
        "    c.optim.warmup_steps = 0\n    c.checkpoint.every = 1\n    c.mesh.data = 1\n" + extra + "    return c\n")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """(config file, workdir) of the tiny model trained for one step: each case fails on a copy.
    Trained by whichever xdist worker comes first, in the folder the workers share."""
    from filelock import FileLock

    from sftjax.config import load_config
    from sftjax.train.loop import run

    base = tmp_path_factory.getbasetemp()  # under xdist, one per worker inside the run's own folder
    home = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "bad-inputs-trained"
    config, workdir = home / "tiny.py", home / "w"
    with FileLock(f"{home}.lock"):
        if not (home / "done").exists():
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()
            run(load_config(_write_config(config, tiny_model_dir)), str(workdir))
            (home / "done").touch()
    assert os.listdir(workdir / "checkpoints")
    return str(config), str(workdir)


def _env(devices: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are for in-process tests
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _digest(folder) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _fails(args: list[str], expect: str, devices: int | None = None, workdir=None) -> str:
    """Run the CLI with `args`; assert one clean error holding `expect` and an untouched `workdir`."""
    before = _digest(workdir) if workdir else None
    r = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], env=_env(devices), capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert expect in errors[0], (expect, errors[0])
    if workdir:
        assert os.path.isdir(os.path.join(workdir, "checkpoints"))
        assert _digest(workdir) == before, "the failed run changed the workdir"
    return errors[0]


def _train_fails(trained, tmp_path, expect: str, *overrides: str, config=None, devices=None, fresh=False) -> str:
    """`sftjax train` with `overrides` (and `config` if given) on a copy of the trained workdir, or on
    a new one if `fresh` (a workdir trained on another base model fails for that reason first)."""
    workdir = tmp_path / "w"
    if not fresh:
        shutil.copytree(trained[1], workdir)
    return _fails(["train", f"--config={config or trained[0]}", f"--workdir={workdir}", *overrides], expect,
                  devices, None if fresh else workdir)


def _data(tmp_path, text: str | bytes, name: str = "bad.jsonl") -> str:
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


def _model_copy(src: str, dst, skip=("model.safetensors",)) -> str:
    """A model folder linking to `src`'s files except `skip` (to be replaced by the case)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f not in skip:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


def _read_only_dir(tmp_path) -> str:
    """A folder nobody can create anything in: a chmod 555 folder, or sysfs as root (root ignores modes)."""
    if os.geteuid() == 0:
        return "/sys"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro)


# --- data files ---------------------------------------------------------------------------------

def test_malformed_json_line(trained, tmp_path):
    f = _data(tmp_path, REPLY + "{oops\n" + REPLY)
    _train_fails(trained, tmp_path, f"{f}:2: malformed JSON", f"--config.data.train={f}")


def test_truncated_last_line(trained, tmp_path):
    f = _data(tmp_path, REPLY * 2 + REPLY[:30])
    assert "truncated" in _train_fails(trained, tmp_path, f"{f}:3: malformed JSON", f"--config.data.train={f}")


def test_messages_not_a_list(trained, tmp_path):
    f = _data(tmp_path, '{"messages": "Hi? Hello."}\n')
    _train_fails(trained, tmp_path, f"{f}:1: field 'messages' must be a non-empty list", f"--config.data.train={f}")


def test_content_a_number(trained, tmp_path):
    f = _data(tmp_path, REPLY + '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": 4}]}\n')
    _train_fails(trained, tmp_path, f"{f}:2: messages[1]: field 'content' must be a string, not int",
                 f"--config.data.train={f}")


def test_missing_field(trained, tmp_path):
    f = _data(tmp_path, '{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": "Say bye."}\n')
    _train_fails(trained, tmp_path, f"{f}:2: field 'output' is missing", f"--config.data.train={f}")


def test_unknown_record_shape(trained, tmp_path):
    f = _data(tmp_path, '{"question": "Hi?", "answer": "Hello."}\n')
    _train_fails(trained, tmp_path, f"{f}:1: cannot tell the record format (found keys: question, answer)",
                 f"--config.data.train={f}")


def test_conversation_without_assistant_turn(trained, tmp_path):
    f = _data(tmp_path, '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}\n')
    _train_fails(trained, tmp_path, f"{f}:1: no assistant message", f"--config.data.train={f}")


def test_nothing_left_after_quality_filter(trained, tmp_path):
    f = _data(tmp_path, "".join(f'{{"instruction": "Question {i}?", "output": " "}}\n' for i in range(5)))
    _train_fails(trained, tmp_path, f"{f}: no records left after filtering", f"--config.data.train={f}")


def test_nothing_left_after_min_tokens(trained, tmp_path):
    msg = _train_fails(trained, tmp_path, f"{CHAT}: no usable examples left of 20", "--config.data.min_tokens=5000")
    assert "data.min_tokens" in msg


def test_non_utf8_bytes(trained, tmp_path):
    f = _data(tmp_path, REPLY.encode() + b'{"instruction": "caf\xe9?", "output": "Oui."}\n')
    _train_fails(trained, tmp_path, f"{f}:2: not valid UTF-8", f"--config.data.train={f}")


def test_label_outside_data_labels(trained, tmp_path):
    f = _data(tmp_path, '{"text": "great film", "label": "pos"}\n{"text": "so-so", "label": "maybe"}\n')
    _train_fails(trained, tmp_path, f"{f}:2: label 'maybe' is not in data.labels (pos, neg)",
                 f"--config.data.train={f}", "--config.data.labels=('pos','neg')")


def test_data_file_missing(trained, tmp_path):
    f = str(tmp_path / "nowhere.jsonl")
    _train_fails(trained, tmp_path, f"{f}: data file not found", f"--config.data.train={f}")


def test_data_file_empty(trained, tmp_path):
    f = _data(tmp_path, "")
    _train_fails(trained, tmp_path, f"{f}: no records (the file is empty)", f"--config.data.train={f}")


# --- config ---------------------------------------------------------------------------------------

def test_unknown_key_in_config_file(trained, tmp_path, tiny_model_dir):
    cfg = _write_config(tmp_path / "typo.py", tiny_model_dir, "    c.train.stpes = 3\n")
    _train_fails(trained, tmp_path, f"{cfg}: unknown config key 'train.stpes' (did you mean 'steps'?)", config=cfg)


def test_wrong_type_in_config_file(trained, tmp_path, tiny_model_dir):
    cfg = _write_config(tmp_path / "typed.py", tiny_model_dir, "    c.optim.lr = 'fast'\n")
    line = 1 + open(cfg).read().splitlines().index("    c.optim.lr = 'fast'")  # the config file's own line
    msg = _train_fails(trained, tmp_path, f"{cfg}:{line}: TypeError", config=cfg)
    assert "'lr'" in msg


def test_unknown_override_key(trained, tmp_path):
    _train_fails(trained, tmp_path, "--config.optim.lrr: unknown config key 'optim.lrr' (did you mean 'lr'?)",
                 "--config.optim.lrr=1e-4")


def test_override_of_wrong_type(trained, tmp_path):
    _train_fails(trained, tmp_path, "--config.train.steps: 'ten' is not a valid int", "--config.train.steps=ten")


def test_negative_learning_rate(trained, tmp_path):
    _train_fails(trained, tmp_path, "optim.lr: must be positive, got -0.0001", "--config.optim.lr=-1e-4")


def test_zero_batch(trained, tmp_path):
    _train_fails(trained, tmp_path, "train.batch_size: must be positive, got 0", "--config.train.batch_size=0")


def test_grad_accum_not_dividing_batch(trained, tmp_path):
    _train_fails(trained, tmp_path, "train.batch_size: 8 is not divisible by train.grad_accum=3",
                 "--config.train.grad_accum=3")


def test_config_is_a_folder(trained, tmp_path):
    _train_fails(trained, tmp_path, f"--config: {tmp_path} is a folder", config=tmp_path)


def test_config_not_python(trained, tmp_path):
    cfg = _data(tmp_path, '{"train": {"steps": 1}}', "cfg.json")
    _train_fails(trained, tmp_path, f"--config: {cfg} is not a Python file", config=cfg)


# --- mesh (8 simulated devices) ------------------------------------------------------------------

def test_mesh_not_dividing_the_devices(trained, tmp_path):
    _train_fails(trained, tmp_path, "mesh: 8 devices cannot be split with the fixed axes of size 3",
                 "--config.mesh.data=-1", "--config.mesh.tensor=3", devices=8)


def test_tensor_axis_not_dividing_the_heads(trained, tmp_path):
    _train_fails(trained, tmp_path, "mesh.tensor: 8 devices do not divide the model's 4 attention heads",
                 "--config.mesh.tensor=8", devices=8)


# --- model folders --------------------------------------------------------------------------------

def test_missing_model_path(trained, tmp_path):
    path = str(tmp_path / "no-such-model")
    _train_fails(trained, tmp_path, f"model.path: {path!r} is neither a HF model folder nor a .gguf file",
                 f"--config.model.path={path}")


def test_truncated_safetensors(trained, tmp_path, tiny_model_dir):
    model = _model_copy(tiny_model_dir, tmp_path / "model")
    with open(os.path.join(tiny_model_dir, "model.safetensors"), "rb") as f:
        head = f.read(1 << 20)
    with open(os.path.join(model, "model.safetensors"), "wb") as f:
        f.write(head)
    _train_fails(trained, tmp_path, f"{model}/model.safetensors: not a readable safetensors file",
                 f"--config.model.path={model}", fresh=True)


def test_tokenizer_larger_than_vocabulary(trained, tmp_path, tiny_model_dir):
    """config.json says 1000 tokens, the tokenizer has 49152: ids past the embedding, which JAX would
    not catch (out-of-range lookups clamp or give NaN), so it must fail before anything runs."""
    model = _model_copy(tiny_model_dir, tmp_path / "small-vocab", skip=("config.json",))
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        hf = json.load(f) | {"vocab_size": 1000}
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(hf, f)
    _train_fails(trained, tmp_path, f"{model}/config.json: vocab_size is 1000 but the folder's tokenizer has 49152 "
                 "tokens", f"--config.model.path={model}", fresh=True)


def test_unsupported_architecture(trained, tmp_path, tiny_model_dir):
    model = _model_copy(tiny_model_dir, tmp_path / "gpt2", skip=("config.json",))
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        hf = json.load(f) | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(hf, f)
    _train_fails(trained, tmp_path, f"{model}/config.json: model_type 'gpt2' is not supported",
                 f"--config.model.path={model}", fresh=True)


# --- paths ------------------------------------------------------------------------------------------

def test_workdir_under_read_only_folder(trained, tmp_path):
    workdir = os.path.join(_read_only_dir(tmp_path), "sftjax-run")
    _fails(["train", f"--config={trained[0]}", f"--workdir={workdir}"], f"--workdir: cannot write in {workdir}")
    assert not os.path.exists(workdir)


def test_workdir_is_a_file(trained, tmp_path):
    workdir = _data(tmp_path, "not a folder", "run")
    _fails(["train", f"--config={trained[0]}", f"--workdir={workdir}"], f"--workdir: {workdir} is an existing file")


def test_export_out_under_a_file(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained[1], workdir)
    out = os.path.join(_data(tmp_path, "a file", "exports"), "merged")
    _fails(["export", f"--workdir={workdir}", f"--out={out}"], f"--out: cannot write in {out}", workdir=workdir)


def test_export_out_read_only(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained[1], workdir)
    out = os.path.join(_read_only_dir(tmp_path), "merged")
    _fails(["export", f"--workdir={workdir}", f"--out={out}", "--format=peft"], f"--out: cannot write in {out}",
           workdir=workdir)


def test_generate_on_untrained_workdir(tmp_path):
    _fails(["generate", f"--workdir={tmp_path}", "--prompt=Hi"],
           f"--workdir: {tmp_path}/sftjax_config.json not found; run `sftjax train")


def test_export_of_missing_workdir(tmp_path):
    workdir = tmp_path / "never-made"
    _fails(["export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"],
           f"--workdir: {workdir}/sftjax_config.json not found")


# --- checkpoints -----------------------------------------------------------------------------------

def test_workdir_trained_on_a_different_base(trained, tmp_path, tiny_model_dir):
    """Same shapes, other weights: the LoRA checkpoint would load silently; the recorded fingerprint
    stops it before the data or the model load, naming both bases."""
    from safetensors.numpy import load_file, save_file

    model = _model_copy(tiny_model_dir, tmp_path / "other-base")
    weights = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    save_file({k: v + v.dtype.type(0.01) for k, v in weights.items()}, os.path.join(model, "model.safetensors"),
              metadata={"format": "pt"})
    err = _train_fails(trained, tmp_path, "was trained on the base", f"--config.model.path={model}")
    assert "tiny-llama (fingerprint" in err and model in err and "use the original base, or a new --workdir" in err


def test_no_readable_checkpoint(trained, tmp_path):
    """Every checkpoint truncated: one error listing them; the broken ones are moved aside, byte for
    byte, never deleted."""
    workdir = tmp_path / "w"
    shutil.copytree(trained[1], workdir)
    ckpts = workdir / "checkpoints"
    for step in os.listdir(ckpts):
        state = [os.path.join(d, f) for d, _, fs in os.walk(ckpts / step / "state") for f in fs]
        big = max(state, key=os.path.getsize)
        os.truncate(big, os.path.getsize(big) // 2)
    broken = {s: _digest(ckpts / s) for s in os.listdir(ckpts)}
    _fails(["train", f"--config={trained[0]}", f"--workdir={workdir}"], "--workdir: no readable checkpoint in")
    aside = workdir / "corrupt_checkpoints"
    assert {d.split("-")[0]: _digest(aside / d) for d in os.listdir(aside)} == broken
