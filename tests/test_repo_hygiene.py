"""The shipped code deserves trust_remote_code=True: a static scan of the repository-root modules, and a dynamic
audit of what they do when loaded and run.

Root *.py files are what the dynamic-module loader copies and runs with the user's rights. They must
not unpickle (torch.load without weights_only=True), evaluate strings, start processes, touch the
network or print; they may only import each other with flat relative imports (the only form the
loader copies), and importing them must only define things. The converter (scripts/convert_checkpoint.py and
scripts/converters/) reads untrusted checkpoints, so it is held to the same unsafe-loading rules.
The static scan is backed by an audit hook (`sys.addaudithook`) in a fresh process that loads every root module
through the Auto classes and runs the models and the tokenizer: no process, socket, unpickled global or file
written outside the save folder and the module cache may appear.
"""

import ast
import json
from pathlib import Path

import pytest
from helpers import REPO_ROOT, run_fresh

ROOT_MODULES = sorted(REPO_ROOT.glob("*.py"))
CONVERTER_MODULES = [
    REPO_ROOT / "scripts" / "convert_checkpoint.py",
    *sorted(REPO_ROOT.glob("scripts/converters/*.py")),
]
NETWORK_OR_PROCESS = {
    "subprocess", "socket", "socketserver", "requests", "urllib", "urllib3", "http", "httpx", "aiohttp", "ftplib",
    "smtplib", "telnetlib", "xmlrpc", "huggingface_hub", "multiprocessing", "pty", "ctypes",
}  # fmt: skip
UNSAFE_DESERIALISERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
FORBIDDEN_IMPORTS = NETWORK_OR_PROCESS | UNSAFE_DESERIALISERS
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "print", "breakpoint", "input"}
OS_PROCESS_CALLS = {"system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execlp", "execvp", "spawnv"}
OS_PROCESS_CALLS |= {"spawnve", "spawnl", "spawnlp", "posix_spawn", "posix_spawnp", "startfile", "kill"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _torch_aliases(tree: ast.Module) -> set[str]:
    """Names bound to the torch module (`import torch`, `import torch as t`) or to torch.serialization."""
    names = {"torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name in ("torch", "torch.serialization") and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "serialization"}
    return names


def _unsafe_loading(tree: ast.Module) -> list[str]:
    """torch.load without weights_only=True (under any alias, or imported by name), TorchScript loading, numpy
    pickles, unsafe deserialisers, getattr(torch, "load"), eval/exec."""
    problems, torch_names = [], _torch_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_DESERIALISERS]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in UNSAFE_DESERIALISERS:
                problems.append(f"from {node.module} import ...")
            if node.module.startswith("torch") and any(a.name == "load" for a in node.names):
                problems.append(
                    f"line {node.lineno}: from {node.module} import load (use torch.load(weights_only=True))"
                )
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            receiver = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if isinstance(func, ast.Name) and name in {"eval", "exec", "compile", "__import__"}:
                problems.append(f"line {node.lineno}: {name}()")
            if name == "load" and (receiver in torch_names or receiver.endswith("serialization")):
                if keywords.get("weights_only") is not True:
                    problems.append(f"line {node.lineno}: {receiver}.load without weights_only=True")
            if name == "load" and receiver.endswith("jit"):
                problems.append(f"line {node.lineno}: TorchScript loading runs code")
            if name == "load" and keywords.get("allow_pickle") is True:
                problems.append(f"line {node.lineno}: load(allow_pickle=True)")
            if name == "getattr" and any(getattr(a, "value", None) == "load" for a in node.args[1:]):
                problems.append(f"line {node.lineno}: getattr(..., 'load')")
    return problems


@pytest.mark.parametrize("path", ROOT_MODULES, ids=lambda p: p.name)
def test_no_unsafe_calls_or_imports(path):
    tree = _tree(path)
    problems = _unsafe_loading(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in NETWORK_OR_PROCESS]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in NETWORK_OR_PROCESS:
                problems.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(func, ast.Name) and name in FORBIDDEN_CALLS - {"eval", "exec", "compile", "__import__"}:
                problems.append(f"line {node.lineno}: {name}()")
            if name in OS_PROCESS_CALLS and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "os":
                problems.append(f"line {node.lineno}: os.{name}()")
            if name in {"import_module", "hf_hub_download", "snapshot_download", "urlopen"}:
                problems.append(f"line {node.lineno}: {name}() (dynamic import or download)")
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", CONVERTER_MODULES, ids=lambda p: p.name)
def test_converter_reads_checkpoints_safely(path):
    """The converter opens untrusted checkpoints: only safetensors and torch.load(weights_only=True)."""
    problems = _unsafe_loading(_tree(path))
    assert not problems, f"{path.relative_to(REPO_ROOT)}: " + "; ".join(problems)


def test_the_scan_catches_what_it_looks_for():
    """The scanner itself: each unsafe form below is reported, the safe forms are not."""
    unsafe = [
        "import torch\ntorch.load('x')",
        "import torch as t\nt.load('x', weights_only=False)",
        "from torch import load",
        "import torch\ntorch.serialization.load('x')",
        "import pickle",
        "import torch\ntorch.jit.load('m.pt')",
        "import numpy as np\nnp.load('x', allow_pickle=True)",
        "import torch\ngetattr(torch, 'load')('x')",
        "eval('1')",
    ]
    for code in unsafe:
        assert _unsafe_loading(ast.parse(code)), code
    safe = "import torch\nfrom safetensors.torch import load_file\ntorch.load('x', weights_only=True)\nload_file('y')"
    assert _unsafe_loading(ast.parse(safe)) == []


@pytest.mark.parametrize("path", ROOT_MODULES, ids=lambda p: p.name)
def test_relative_imports_are_flat_and_present(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.level == 1 and node.module and "." not in node.module, (
                f"{path.name}:{node.lineno}: only `from .module import X` is copied by the dynamic-module loader"
            )
            assert (REPO_ROOT / f"{node.module}.py").is_file(), f"{path.name} imports missing .{node.module}"


@pytest.mark.parametrize("path", ROOT_MODULES, ids=lambda p: p.name)
def test_import_time_only_defines(path):
    """Module level holds definitions, imports, docstrings and constant assignments; no calls with effects."""
    allowed = (
        ast.Import,
        ast.ImportFrom,
        ast.FunctionDef,
        ast.AsyncFunctionDef,
        ast.ClassDef,
        ast.Assign,
        ast.AnnAssign,
        ast.Try,
        ast.If,
        ast.Raise,  # refusing to load (transformers_compat's version floor) is not an effect
    )
    tree = _tree(path)
    dataclasses = {  # frozen records defined here: building one at import time only stores values
        n.name for n in tree.body if isinstance(n, ast.ClassDef) and "dataclass" in ast.unparse(n.decorator_list)
    }
    for node in _statements(tree.body):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        assert isinstance(node, allowed), f"{path.name}:{node.lineno}: top-level {type(node).__name__} statement"
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for call in (c for c in ast.walk(node.value) if isinstance(c, ast.Call)):
                name = ast.unparse(call.func)
                assert name in IMPORT_TIME_CALLS or name in dataclasses, (
                    f"{path.name}:{node.lineno}: {name}() runs at import time"
                )


# Calls a module may make while it is imported: they only build values.
IMPORT_TIME_CALLS = {"logging.get_logger", "frozenset", "tuple", "dict", "set", "list", "re.compile", "math.sqrt"}


def _statements(body: list[ast.stmt]):
    """Top-level statements, looking inside `if` / `try` blocks (e.g. optional imports)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _statements(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _statements(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                yield from _statements(handler.body)


def test_config_auto_map_points_at_existing_classes():
    """Every auto_map entry in the root's JSON configs names a class defined in a root module."""
    defined = {}
    for path in ROOT_MODULES:
        defined[path.stem] = {n.name for n in ast.walk(_tree(path)) if isinstance(n, ast.ClassDef)}
    configs = [p for p in (REPO_ROOT / "config.json", REPO_ROOT / "tokenizer_config.json") if p.is_file()]
    if not configs:
        pytest.skip("no config.json / tokenizer_config.json at the root yet")
    for cfg in configs:
        for auto, target in json.loads(cfg.read_text())["auto_map"].items():
            for ref in target if isinstance(target, list) else [target]:
                if ref is None:
                    continue
                module, cls = ref.rsplit(".", 1)
                assert cls in defined.get(module, set()), f"{cfg.name}: auto_map[{auto}] = {ref} does not exist"


AUDIT = """
import json, os, sys, sysconfig, tempfile
import torch, transformers

transformers.logging.set_verbosity_error()
root = sys.argv[1]
events, save_dir, hf_home = [], tempfile.mkdtemp(prefix="audit_save_"), os.environ["HF_HOME"]
FORBIDDEN = ("subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.kill", "socket.",
             "urllib.", "http.", "pickle.find_class", "ctypes.dlopen", "webbrowser.")
STDLIB = (sysconfig.get_paths()["stdlib"], "<")  # "<frozen importlib...>"
MODULES = os.path.join(hf_home, "modules")  # where the dynamic-module loader copies the code


def ours(path: str) -> bool:
    return path.startswith(MODULES) or os.path.dirname(os.path.abspath(path)) == os.path.abspath(root)


def culprit() -> str:
    # the innermost frame outside the standard library: the code that asked for the event
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(STDLIB):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def hook(event, args):
    if event.startswith(FORBIDDEN) and ours(culprit()):
        events.append(f"{event} {args!r} from {culprit()}"[:300])
    elif event == "open" and isinstance(args[0], str) and isinstance(args[1], str) and set(args[1]) & set("wax+"):
        path = os.path.realpath(args[0])
        if not path.startswith((os.path.realpath(save_dir), os.path.realpath(hf_home), "/dev/")):
            if ours(culprit()):
                events.append(f"write {path} from {culprit()}")


sys.addaudithook(hook)
tok = transformers.AutoTokenizer.from_pretrained(root, trust_remote_code=True)
model = transformers.AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True).eval()
batch = tok(["the capital of [MASK] is paris", "one plus [MASK] is three"], return_tensors="pt", padding=True)
with torch.no_grad():
    model(**batch)
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
tok.batch_decode(out)
model.save_pretrained(save_dir)
tok.save_pretrained(save_dir)
for auto in ("AutoModel", "AutoModelForSeq2SeqLM"):
    getattr(transformers, auto).from_pretrained(save_dir, trust_remote_code=True)
from transformers.dynamic_module_utils import get_class_from_dynamic_module
bart = get_class_from_dynamic_module("modeling_bart_gen.BartGenForConditionalGeneration", root)
sparse = get_class_from_dynamic_module("modeling_gpt2_sparse.GPT2SparseLMHeadModel", root)
with torch.no_grad():
    config = bart.config_class(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    bart(config).eval().generate(torch.tensor([[0, 5, 6, 2]]), max_new_tokens=3)
    config = sparse.config_class(vocab_size=50, hidden_size=16, num_layers=1, num_attention_heads=2, num_image_tokens=40)
    sparse(config).eval().generate(torch.tensor([[41, 5, 6]]), max_new_tokens=3, is_sparse=2, pad_token_id=0)
print(json.dumps(events))
"""


def test_loading_and_running_the_code_opens_no_process_socket_or_pickle():
    """An audit hook in a fresh process: loading the embedded model and tokenizer through the Auto classes (which
    imports the GLM modules), generating, saving and reloading, and running BART-gen and sparse GPT-2, triggers no
    subprocess, socket, unpickling of a global, native library load or file write outside the save folder and the
    module cache."""
    events = json.loads(run_fresh(AUDIT, str(REPO_ROOT)).strip().splitlines()[-1])
    assert events == [], "\n".join(events)
