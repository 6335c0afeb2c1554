"""`chat_template:` in a merge configuration, as mergekit 0.1.5 reads it (mergekit/merge.py,
_set_chat_template): "auto" (the most common template among the inputs' tokenizers), "chatml", or
the Jinja text. pyops copies the tokenizer files and writes the template where transformers 5's
save_pretrained puts it (chat_template.jinja, no `chat_template` key in tokenizer_config.json), so
`AutoTokenizer.from_pretrained(out).chat_template` is the template mergekit's output loads with
(chatml: pyops' own text, rendering every conversation as mergekit's file does). A template that
cannot be written is an error (exit 2), never a note."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pyops.__main__ import main as cli_main
from pyops.bench.merging import write_llama_checkpoint
from pyops.integrations import prefer_installed_kernels
from pyops.merging import ConfigError, run_merge
from pyops.merging.config import CHATML

prefer_installed_kernels()  # the checkout's kernels/ folder would shadow the distribution transformers imports
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MERGEKIT = os.environ.get("PYOPS_MERGEKIT_YAML")
TINY = dict(vocab=48, hidden=16, intermediate=24, layers=2, heads=2)
JINJA = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
OTHER = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]


def _tokenizer(template=None):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "bye": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    if template is not None:
        fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base (a tokenizer without a template), m1, m2 (the same template), m3 (another one)."""
    root = tmp_path_factory.mktemp("chat")
    base = write_llama_checkpoint(str(root / "bare"), 0, cfg=TINY)  # weights without a tokenizer
    for k, (name, template) in enumerate((("base", None), ("m1", JINJA), ("m2", JINJA), ("m3", OTHER)), 1):
        write_llama_checkpoint(str(root / name), k, base=base, cfg=TINY)
        _tokenizer(template).save_pretrained(str(root / name))
    return root


def _config(root: Path, template: str, base: str = "base", models=("m1", "m2", "m3")) -> str:
    listed = "".join(f"  - model: {root / m}\n    parameters: {{weight: 0.3}}\n" for m in dict.fromkeys((base, *models)))
    return (f"merge_method: linear\nbase_model: {root / base}\nmodels:\n{listed}"
            f"chat_template: {json.dumps(template)}\n")


def _merge(tmp_path: Path, text: str, **kw) -> Path:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    run_merge(cfg, tmp_path / "out", progress=False, **kw)
    return tmp_path / "out"


def _loaded(out: Path) -> str:
    return transformers.AutoTokenizer.from_pretrained(str(out)).chat_template


def _render(template: str) -> str:
    return _tokenizer(template).apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_jinja_text_is_written_as_transformers_saves_it(world, tmp_path):
    out = _merge(tmp_path, _config(world, OTHER))
    assert (out / "chat_template.jinja").read_text("utf-8") == OTHER
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text("utf-8"))
    assert _loaded(out) == OTHER


def test_chatml_renders_the_chatml_format(world, tmp_path):
    out = _merge(tmp_path, _config(world, "chatml"))
    assert _loaded(out) == CHATML
    want = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
            "hello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")
    assert _render(_loaded(out)) == want


def test_auto_takes_the_most_common_template_of_the_inputs(world, tmp_path):
    assert _loaded(_merge(tmp_path, _config(world, "auto"))) == JINJA.strip()


def test_auto_tie_goes_to_the_first_input(world, tmp_path):
    assert _loaded(_merge(tmp_path, _config(world, "auto", models=("m3", "m1")))) == OTHER


def test_auto_without_any_template_copies_the_tokenizer_as_it_is(world, tmp_path):
    out = _merge(tmp_path, _config(world, "auto", models=("base",)))
    assert not (out / "chat_template.jinja").exists()
    assert (out / "tokenizer.json").read_bytes() == (world / "base" / "tokenizer.json").read_bytes()


def test_a_template_key_in_the_copied_tokenizer_config_is_replaced(world, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in (world / "base").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    conf = json.loads((src / "tokenizer_config.json").read_text("utf-8"))
    (src / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": OTHER}))
    (tmp_path / "run").mkdir()
    out = _merge(tmp_path / "run", _config(src.parent, JINJA, base="src", models=("src",)))
    assert _loaded(out) == JINJA
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text("utf-8"))
    assert json.loads((src / "tokenizer_config.json").read_text("utf-8"))["chat_template"] == OTHER  # input kept


def _refused(tmp_path: Path, text: str, capsys, pattern: str, *args: str) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        run_merge(cfg, tmp_path / "out", progress=False, copy_tokenizer="--no-copy-tokenizer" not in args)
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyops merge: error: ") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


@pytest.mark.parametrize("template,pattern", [
    ("llama3", r"the named template 'llama3' is not shipped with pyops \(chatml is\)"),
    ("nonesuch", r"invalid chat template 'nonesuch'"),
    ("{{ short }}", r"invalid chat template '\{\{ short \}\}'"),
], ids=["mergekit-name", "unknown-name", "too-short"])
def test_templates_mergekit_rejects_or_pyops_does_not_ship_are_refused(world, tmp_path, capsys, template, pattern):
    _refused(tmp_path, _config(world, template), capsys, r"line 12, column 1: chat_template: " + pattern)


def test_a_template_without_a_tokenizer_to_set_it_on_is_refused(world, tmp_path, capsys):
    _refused(tmp_path, _config(world, JINJA, base="bare"), capsys,
             r"chat_template: the tokenizer source .*bare has no tokenizer_config\.json")


def test_a_template_with_no_copy_tokenizer_is_refused(world, tmp_path, capsys):
    _refused(tmp_path, _config(world, JINJA), capsys, r"chat_template: the template is written with the tokenizer "
             r"files, which --no-copy-tokenizer leaves out", "--no-copy-tokenizer")


def test_a_non_string_template_is_refused(world, tmp_path, capsys):
    text = _config(world, JINJA).replace(f"chat_template: {json.dumps(JINJA)}", "chat_template: [1, 2]")
    _refused(tmp_path, text, capsys, r"chat_template: expected a string \(auto, chatml or a Jinja template\), got list")


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found (PYOPS_MERGEKIT_YAML unset)")
@pytest.mark.parametrize("template", ["chatml", "auto", JINJA], ids=["chatml", "auto", "jinja"])
def test_same_template_as_mergekit(world, tmp_path, template):
    """The output loads with mergekit's template (chatml: renders the same conversation)."""
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(_config(world, template, models=("m1", "m2")))
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--lazy-unpickle"], check=True, capture_output=True,
                   cwd=tmp_path)
    run_merge(cfg, tmp_path / "py", progress=False)
    mk, py = _loaded(tmp_path / "mk"), _loaded(tmp_path / "py")
    if template == "chatml":
        assert _render(py) == _render(mk)
    else:
        assert py == mk
