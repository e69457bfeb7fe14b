"""Tests of tokenization_glm.GLMTokenizer: reference ids (golden data), round trips, padding, blank infilling
inputs, the chat template, bad inputs, saving and loading across transformers versions, new SentencePiece models.
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from fixtures import repo_module
from helpers import REPO_ROOT, TEST_DATA, TOKENIZER_DATA, code_files, fresh_env, run_fresh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GLMTokenizer = repo_module("tokenization_glm").GLMTokenizer
# tokenization_glm.py and the sibling modules it imports: what a saved or converted tokenizer folder ships
TOKENIZER_CODE = set(code_files("tokenization_glm.py"))

GOLDEN = json.loads((TEST_DATA / "tokenizer" / "golden.json").read_text(encoding="utf-8"))
# GLM's GLMGPT2Tokenizer (glm-10b, glm-2b) under transformers 4.33.3; made as tests/data/glm_reference/README.md says
GOLDEN_EN = json.loads((TEST_DATA / "glm_reference" / "tokenizer_en.json").read_text(encoding="utf-8"))
GPT2_FILES = dict(
    bpe_vocab_file=str(TOKENIZER_DATA / "gpt2-vocab.json"), merges_file=str(TOKENIZER_DATA / "gpt2-merges.txt")
)
VENVS = {"4": REPO_ROOT / ".venv" / "tf4" / "bin" / "python", "5": REPO_ROOT / ".venv" / "tf5" / "bin" / "python"}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def chatglm() -> GLMTokenizer:
    return GLMTokenizer(str(TOKENIZER_DATA / "ice_text.model"), flavour="chatglm")


@pytest.fixture(scope="module")
def glmzh() -> GLMTokenizer:
    return GLMTokenizer(str(TOKENIZER_DATA / "cog-pretrain.model"), flavour="glm-chinese")


@pytest.fixture(scope="module")
def glmen() -> GLMTokenizer:
    return GLMTokenizer(flavour="glm-english", **GPT2_FILES)


def _mismatches(pairs) -> str:
    return "\n".join(f"{text!r}: ours {ours} != reference {ref}" for text, ours, ref in pairs if ours != ref)


# ----------------------------------------------------------------------------- reference ids (golden data)
def test_chatglm_ids_match_thudm(chatglm):
    cases = GOLDEN["chatglm"]["cases"]
    assert not _mismatches((c["text"], chatglm(c["text"])["input_ids"], c["ids_gmask_special"]) for c in cases)
    # The only deliberate difference from THUDM: the literal text [gMASK]/[sMASK] is the special token.
    differ = {c["text"] for c in cases if c["ids"] != c["ids_gmask_special"]}
    assert differ == {"[gMASK]", "text [gMASK] <sop>", "[sMASK] sentence"}
    assert chatglm("[gMASK]")["input_ids"] == [chatglm.gmask_token_id, chatglm.gmask_token_id, chatglm.sop_token_id]


def test_chatglm_decode_matches_thudm(chatglm):
    for c in GOLDEN["chatglm"]["cases"]:
        assert chatglm.decode(c["ids"]) == c["decoded"], c["text"]
        assert chatglm.decode(c["ids"], clean_up_tokenization_spaces=True) == c["decoded_default"], c["text"]
        assert chatglm.decode(c["ids"], skip_special_tokens=True) == c["decoded_skip"], c["text"]


def test_chatglm_pairs_and_special_token_layout(chatglm):
    for p in GOLDEN["chatglm"]["pairs"]:
        assert chatglm(p["a"], p["b"])["input_ids"] == p["ids"]
    ids = chatglm.convert_tokens_to_ids(["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>", "<unk>", "<n>"])
    assert ids == [130000, 130001, 130002, 130004, 130005, 3, 0, 4]
    assert (chatglm.sop_token_id, chatglm.eop_token_id, chatglm.bos_token_id, chatglm.eos_token_id) == (
        130004,
        130005,
        130004,
        130005,
    )
    assert len(chatglm) == chatglm.vocab_size == 130344
    assert chatglm.get_special_tokens_mask([5, 6]) == [0, 0, 1, 1]


def test_glm_chinese_ids_and_decode_match_glm(glmzh):
    cases = GOLDEN["glm_chinese"]["cases"]
    assert not _mismatches((c["text"], glmzh(c["text"])["input_ids"], c["ids"]) for c in cases)
    for c in cases:
        assert glmzh.decode(c["ids"]) == c["decoded"], c["text"]
        assert glmzh.decode(c["ids"], clean_up_tokenization_spaces=True) == c["decoded_default"], c["text"]
        assert glmzh.decode(c["ids"], skip_special_tokens=True) == c["decoded_skip"], c["text"]


def test_glm_chinese_special_token_ids_and_left_truncation(glmzh):
    layout = ["<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNUSED1]", "[UNUSED2]"]
    layout += ["<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]"]
    assert glmzh.convert_tokens_to_ids(layout) == list(range(50000, 50010))
    assert glmzh.unk_token_id == 0 and glmzh.pad_token_id == glmzh.eos_token_id == 50000
    assert glmzh.mask_token_ids == [50003, 50008, 50009]
    assert (glmzh.sop_token_id, glmzh.eop_token_id) == (50006, 50007)
    assert len(glmzh) == glmzh.vocab_size == 50010
    t = GOLDEN["glm_chinese"]["truncation"]
    assert glmzh(t["text"], truncation=True, max_length=t["max_length"])["input_ids"] == t["ids"]
    with pytest.raises(ValueError, match="text_pair"):
        glmzh("a", "b")


def test_glm_english_ids_and_decode_match_glm(glmen):
    cases = GOLDEN_EN["cases"]
    assert not _mismatches((c["text"], glmen(c["text"])["input_ids"], c["ids"]) for c in cases)
    for c in cases:
        assert glmen.decode(c["ids"]) == c["decoded"], c["text"]
        assert glmen.decode(c["ids"], clean_up_tokenization_spaces=True) == c["decoded_default"], c["text"]
        if "[UNK]" not in c["text"]:  # ours lists GLM's [UNK] with the special tokens, GLM's tokenizer did not
            assert glmen.decode(c["ids"], skip_special_tokens=True) == c["decoded_skip"], c["text"]


def test_glm_english_special_token_layout_and_left_truncation(glmen):
    """The ids glm-10b / glm-2b were trained with: GLM's command tokens after GPT-2's 50257."""
    assert {t: glmen.convert_tokens_to_ids(t) for t in GOLDEN_EN["special_ids"]} == GOLDEN_EN["special_ids"]
    assert {name: getattr(glmen, name) for name in GOLDEN_EN["named_ids"]} == GOLDEN_EN["named_ids"]
    assert glmen.mask_token_ids == [50260, 50264, 50263]
    assert len(glmen) == glmen.vocab_size == GOLDEN_EN["len"] == 50265
    t = GOLDEN_EN["truncation"]
    assert glmen(t["text"], truncation=True, max_length=t["max_length"])["input_ids"] == t["ids"]
    assert glmen.convert_tokens_to_ids(["Ġthe", "not-a-piece"]) == [262, glmen.unk_token_id]
    with pytest.raises(ValueError, match="merges.txt"):
        GLMTokenizer(flavour="glm-english", bpe_vocab_file=GPT2_FILES["bpe_vocab_file"])


# ----------------------------------------------------------------------------- blank infilling inputs
def test_generation_inputs_match_glm_reference(glmzh):
    """Ours == GLM's without targets; with targets ours are the reference's sequence + <eop>, labels shifted by one."""
    for g in GOLDEN["glm_chinese"]["generation"]:
        enc = glmzh(g["prompt"], return_tensors="pt")
        gen = glmzh.build_inputs_for_generation(enc, max_gen_length=16)
        assert set(gen) == {"input_ids", "attention_mask"}
        assert gen["input_ids"][0].tolist() == g["gen_input_ids"]
        train = glmzh.build_inputs_for_generation(enc, max_gen_length=16, targets=g["target"])
        ids, labels = train["input_ids"][0].tolist(), train["labels"][0].tolist()
        assert ids[:-1] == g["train_input_ids"] and ids[-1] == glmzh.eop_token_id
        assert labels[1:] == g["train_labels"]  # the reference labels are already shifted: its loss is off by one


def test_english_generation_inputs_match_glm_reference(glmen):
    """As for the Chinese tokenizer; GLM's positions equal the model's own for an unpadded prompt."""
    for g in GOLDEN_EN["generation"]:
        enc = glmen(g["prompt"], return_tensors="pt")
        gen = glmen.build_inputs_for_generation(enc, max_gen_length=16)
        assert gen["input_ids"][0].tolist() == g["gen_input_ids"]
        train = glmen.build_inputs_for_generation(enc, max_gen_length=16, targets=g["target"])
        ids, labels = train["input_ids"][0].tolist(), train["labels"][0].tolist()
        assert ids[:-1] == g["train_input_ids"] and ids[-1] == glmen.eop_token_id
        assert labels[1:] == g["train_labels"]
        # GLM's span positions: the first blank's index (what the model builds from these tokens)
        blank, sop = next(i for i, t in enumerate(ids) if t in glmen.mask_token_ids), len(g["gen_input_ids"]) - 1
        assert g["train_position_ids"][0][sop:] == [blank] * (len(g["train_input_ids"]) - sop)


def test_multiple_choice_inputs_match_glm_reference(glmen):
    """Unpadded examples: exactly GLM's tensors. A right-padded batch: GLM kept each context's padding inside the
    sequence; ours drops it, so every choice moves left by the padding and nothing else changes."""
    for case in GOLDEN_EN["multiple_choice"]:
        contexts, choices = case["contexts"], case["choices"]
        ours = glmen.build_inputs_for_multiple_choice(glmen(contexts, padding=True, return_tensors="pt"), choices)
        lengths = [len(glmen(c)["input_ids"]) for c in contexts]
        width = max(lengths)
        for b, n in enumerate(lengths):
            shift = width - n  # GLM's right padding inside this example
            real = n + sum(len(ids) for ids in case["choice_ids"][b])
            ref_keep = list(range(n)) + list(range(width, width + real - n))
            assert ours["input_ids"][b, :real].tolist() == [case["input_ids"][b][i] for i in ref_keep]
            for row in range(2):
                assert ours["position_ids"][b, row, :real].tolist() == [
                    case["position_ids"][b][row][i] for i in ref_keep
                ]
            ref_mask = [[case["attention_mask"][b][0][i][j] for j in ref_keep] for i in ref_keep]
            assert ours["attention_mask"][b, 0, :real, :real].tolist() == ref_mask
            assert (ours["attention_mask"][b, 0, real:] == 0).all() and (
                ours["input_ids"][b, real:] == glmen.pad_token_id
            ).all()
            for c, (ids, index) in enumerate(zip(case["choice_ids"][b], case["choice_indices"][b])):
                assert ours["choice_ids"][b, c, : len(ids)].tolist() == ids
                assert (ours["choice_ids"][b, c, len(ids) :] == -100).all()
                assert ours["choice_indices"][b, c, : len(ids)].tolist() == [i - shift for i in index]
    with pytest.raises(ValueError, match="one list of answer strings per example"):
        glmen.build_inputs_for_multiple_choice(glmen(["a [MASK] b"], return_tensors="pt"), [["x"], ["y"]])
    with pytest.raises(ValueError, match="no blank token"):
        glmen.build_inputs_for_multiple_choice(glmen(["no blank"], return_tensors="pt"), [["x", "y"]])


@pytest.mark.parametrize("flavour", ["chatglm", "glm-chinese"])
def test_generation_inputs_batched_left_padded_with_causal_labels(flavour, chatglm, glmzh):
    tok = chatglm if flavour == "chatglm" else glmzh
    prompts = ["北京是[MASK]的首都", "清华大学位于北京市海淀区，是[MASK]。它有很长的历史。"]
    targets = ["中国", "一所大学"]
    for side in ("left", "right"):
        enc = tok(prompts, padding=True, padding_side=side, return_tensors="pt")
        out = tok.build_inputs_for_generation(enc, max_gen_length=32, targets=targets)
        assert set(out) == {"input_ids", "attention_mask", "labels"}
        ids, att, labels = out["input_ids"], out["attention_mask"], out["labels"]
        assert ids.shape == att.shape == labels.shape
        for row, (prompt, target) in enumerate(zip(prompts, targets)):
            single = tok.build_inputs_for_generation(tok(prompt, return_tensors="pt"), targets=target)
            n = int(att[row].sum())
            assert att[row, : ids.shape[1] - n].sum() == 0  # left padding
            assert ids[row, -n:].tolist() == single["input_ids"][0].tolist()
            assert labels[row, -n:].tolist() == single["labels"][0].tolist()
            assert (labels[row, : ids.shape[1] - n] == -100).all()
            # Causal-LM convention: labels[i] is the token at i; the first span token's label is at <sop> + 1.
            sop_pos = ids[row].tolist().index(tok.sop_token_id, ids.shape[1] - n)
            assert (labels[row, : sop_pos + 1] == -100).all()
            span = tok.encode(target, add_special_tokens=False) + [tok.eop_token_id]
            assert labels[row, sop_pos + 1 :].tolist() == span
            assert ids[row, sop_pos + 1 :].tolist() == span
    # A loss that shifts by one (logits[:, :-1] vs labels[:, 1:]) sees exactly the span tokens as targets.
    shifted = labels[:, 1:]
    assert shifted[shifted != -100].numel() == sum(len(tok.encode(t, add_special_tokens=False)) + 1 for t in targets)
    # padding=True pads every row to context + 1 + max_gen_length; no targets: only <sop> appended (once)
    enc = tok(prompts, padding=True, return_tensors="pt")
    padded = tok.build_inputs_for_generation(enc, max_gen_length=8, targets=targets, padding=True)
    contexts = [len(tok(p)["input_ids"]) + (0 if flavour == "chatglm" else 1) for p in prompts]
    assert padded["input_ids"].shape[1] == max(contexts) + 8
    gen = tok.build_inputs_for_generation(enc)
    assert (gen["input_ids"][:, -1] == tok.sop_token_id).all()
    assert gen["input_ids"].shape[1] == max(contexts)
    as_lists = tok.build_inputs_for_generation(tok(prompts[0]))
    assert as_lists["input_ids"] == [gen["input_ids"][0, -len(as_lists["input_ids"][0]) :].tolist()]


def test_blankless_prompt_is_a_clear_error(glmzh):
    enc = glmzh(["北京是[MASK]的首都", "没有空白"], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"row 1 has no blank token"):
        glmzh.build_inputs_for_generation(enc)
    with pytest.raises(ValueError, match="targets"):
        glmzh.build_inputs_for_generation(glmzh(["[MASK]"], return_tensors="pt"), targets=["a", "b"])


# ----------------------------------------------------------------------------- padding and batching
def test_padding_side_and_returned_keys(chatglm):
    texts = ["短", "a much longer text here"]
    left = chatglm(texts, padding=True, return_tensors="pt")
    assert set(left) == {"input_ids", "attention_mask"}  # no position_ids, no [1,S,S] masks
    assert chatglm.padding_side == "left"
    assert left["attention_mask"][0, 0] == 0 and left["input_ids"][0, 0] == chatglm.pad_token_id
    right = chatglm(texts, padding=True, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][0, -1] == 0 and right["input_ids"][0, 0] != chatglm.pad_token_id
    assert right["attention_mask"].sum() == left["attention_mask"].sum()
    fixed = chatglm(texts, padding="max_length", max_length=16)
    assert [len(r) for r in fixed["input_ids"]] == [16, 16]


TEXTS = st.lists(st.sampled_from(list("ab 中文\n\t,.") + ["  ", "[MASK]", "[gMASK]", "你好"]), max_size=12).map("".join)


@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
@SETTINGS
def test_batch_encode_equals_single_encode(chatglm, texts):
    batch = chatglm(texts, padding=True)
    for ids, mask, text in zip(batch["input_ids"], batch["attention_mask"], texts):
        assert [i for i, m in zip(ids, mask) if m] == chatglm(text)["input_ids"]
        assert mask == sorted(mask)  # left padding: zeros first


# ----------------------------------------------------------------------------- round trip (chatglm)
def _thudm_preprocess(text: str) -> str:
    """THUDM's whitespace encoding, written independently of the tokenizer (longest runs first)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _roundtrips(text: str) -> bool:
    """Texts decode(encode()) can give back: ice_text's normaliser (NFKC, SentencePiece's whitespace
    folding) changes other texts before any id is produced, so no tokenizer with THUDM's ids can restore
    them: non-NFKC text, control/format characters, U+2581 (SentencePiece's space marker), other kinds
    of space, and a single space at the very start or end (stripped as extra whitespace)."""
    pre = _thudm_preprocess(text)
    return unicodedata.normalize("NFKC", text) == text and not pre.startswith(" ") and not pre.endswith(" ")


ROUNDTRIP_CHARS = st.characters(
    exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Mc", "Me"),
    exclude_characters="\u2581",
)
ROUNDTRIP_TEXT = st.lists(
    st.one_of(ROUNDTRIP_CHARS, st.sampled_from([" ", "\n", "\t"]), st.integers(2, 90).map(lambda n: " " * n)),
    max_size=25,
).map("".join)


@given(text=ROUNDTRIP_TEXT)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_chatglm_decode_encode_roundtrip(chatglm, text):
    if not _roundtrips(text):
        text = unicodedata.normalize("NFKC", text).strip(" ") or "x"
        if not _roundtrips(text):
            return
    assert chatglm.decode(chatglm(text)["input_ids"]) == text


def test_chatglm_roundtrip_whitespace_examples(chatglm):
    for text in ["def f(x):\n\tif x:\n\t\treturn x  # two\n" + " " * 81 + "y", "a" + " " * 200 + "b", "\n\n x \t y"]:
        assert chatglm.decode(chatglm(text)["input_ids"]) == text
        assert chatglm.decode(chatglm(text)["input_ids"], skip_special_tokens=True) == text


# ----------------------------------------------------------------------------- chat template
def _chatglm_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM-6B's prompt as THUDM's chat() builds it."""
    if not history:
        return query
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i}]\n问：{old_query}\n答：{response}\n"
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


@pytest.mark.parametrize("n_history", [0, 1, 3])
def test_chat_template_is_chatglm_prompt(chatglm, n_history):
    history = [(f"问题{i}", f"回答 {i}\n第二行") for i in range(n_history)]
    query = "你好，ChatGLM"
    messages = []
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    messages.append({"role": "user", "content": query})
    prompt = _chatglm_prompt(query, history)
    assert chatglm.apply_chat_template(messages, tokenize=False) == prompt
    ids = chatglm.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"] == chatglm(prompt)["input_ids"]


def test_chat_template_rejects_bad_roles(chatglm):
    with pytest.raises(Exception, match="alternate user and assistant"):
        chatglm.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_clear_errors(tmp_path, chatglm):
    with pytest.raises(ValueError, match="vocab_file"):
        GLMTokenizer(str(tmp_path / "missing.model"))
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        GLMTokenizer(str(bogus))
    with pytest.raises(ValueError, match="flavour"):
        GLMTokenizer(str(TOKENIZER_DATA / "cog-pretrain.model"), flavour="glm-klingon")
    with pytest.raises(ValueError, match=r"lacks pieces.*<sop>"):
        GLMTokenizer(str(TOKENIZER_DATA / "cog-pretrain.model"), flavour="chatglm")
    with pytest.raises((TypeError, ValueError), match="text"):
        chatglm(None)
    with pytest.raises(TypeError, match="text"):
        chatglm.tokenize(None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chatglm.convert_ids_to_tokens(10**7)


# ----------------------------------------------------------------------------- save / load
LOAD_AND_ENCODE = """
    import json, sys
    from transformers import AutoTokenizer
    out = {}
    for folder in sys.argv[1:]:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        texts = ["北京是[MASK]的首都", "code:\\n\\tx  =  1 [gMASK]", "<added_tok> 你好"]
        enc = tok(texts, padding=True)
        out[folder] = {"ids": enc["input_ids"], "mask": enc["attention_mask"], "cls": type(tok).__name__,
                       "decoded": tok.decode(enc["input_ids"][1], skip_special_tokens=True),
                       "special": [tok.sop_token_id, tok.eop_token_id, tok.gmask_token_id, tok.pad_token_id]}
    print(json.dumps(out))
"""


def _expected(tok: GLMTokenizer) -> dict:
    texts = ["北京是[MASK]的首都", "code:\n\tx  =  1 [gMASK]", "<added_tok> 你好"]
    enc = tok(texts, padding=True)
    return {
        "ids": enc["input_ids"],
        "mask": enc["attention_mask"],
        "cls": "GLMTokenizer",
        "decoded": tok.decode(enc["input_ids"][1], skip_special_tokens=True),
        "special": [tok.sop_token_id, tok.eop_token_id, tok.gmask_token_id, tok.pad_token_id],
    }


@pytest.mark.slow
def test_save_load_fresh_process_both_versions(tmp_path):
    """Saved here, loaded through AutoTokenizer in a fresh process of this and of the other transformers version."""
    import transformers

    GLMTokenizer.register_for_auto_class("AutoTokenizer")
    expected = {}
    for flavour, files, vocab_files in [
        ("chatglm", dict(vocab_file=str(TOKENIZER_DATA / "ice_text.model")), {"tokenizer.model"}),
        ("glm-chinese", dict(vocab_file=str(TOKENIZER_DATA / "cog-pretrain.model")), {"tokenizer.model"}),
        ("glm-english", GPT2_FILES, {"vocab.json", "merges.txt"}),
    ]:
        tok = GLMTokenizer(flavour=flavour, **files)
        tok.add_tokens(["<added_tok>"])
        folder = tmp_path / flavour
        tok.save_pretrained(folder)
        assert vocab_files | {"tokenizer_config.json"} | TOKENIZER_CODE <= {p.name for p in folder.iterdir()}
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["auto_map"]["AutoTokenizer"] == ["tokenization_glm.GLMTokenizer", None]
        assert not isinstance(config.get("extra_special_tokens"), list)  # 4.x cannot read that form
        expected[str(folder)] = _expected(tok)
    folders = list(expected)
    same = json.loads(run_fresh(LOAD_AND_ENCODE, *folders))
    assert same == expected
    other = VENVS["4" if transformers.__version__.startswith("5") else "5"]
    if not other.exists():
        pytest.skip(f"no other transformers venv at {other}")
    proc = subprocess.run(
        [str(other), "-c", __import__("textwrap").dedent(LOAD_AND_ENCODE), *folders],
        capture_output=True,
        text=True,
        env=fresh_env(tmp_path / "hf_other"),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout) == expected


def test_pickle_roundtrip(glmzh, glmen):
    clone = pickle.loads(pickle.dumps(glmzh))
    assert clone("北京是[MASK]的首都")["input_ids"] == glmzh("北京是[MASK]的首都")["input_ids"]
    clone = pickle.loads(pickle.dumps(glmen))
    assert (
        clone("The capital of [MASK] is Paris.")["input_ids"] == glmen("The capital of [MASK] is Paris.")["input_ids"]
    )


# ----------------------------------------------------------------------------- a new SentencePiece model
CHATGLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
CHATGLM_WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]


@pytest.fixture(scope="module")
def tiny_sp_model(tmp_path_factory) -> Path:
    """A ~200-piece unigram model trained on a few KB of synthetic text, as the module docstring describes."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tiny_sp")
    rng = random.Random(0)
    syllables = (
        "ka lo mi ne su ta ri po de fi the mod el fill blank code ret urn 北 京 语 言 模 型 生 成 首 都 的 是".split()
    )
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + rng.choice(".,!?。") for _ in range(400)]
    lines += ["def fill(x): return x == 0123456789 # (code) {model} <= [blank]"] * 5
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=200,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=CHATGLM_SPECIALS,
        user_defined_symbols=CHATGLM_WHITESPACE,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_new_sentencepiece_model_works_with_chatglm_flavour(tiny_sp_model, tmp_path):
    tok = GLMTokenizer(str(tiny_sp_model), flavour="chatglm")
    for text in ["the model fills 北京的首都", "def fill():\n\treturn  code\n\n" + " " * 90 + "blank"]:
        ids = tok(text)["input_ids"]
        assert ids[-2:] == [tok.gmask_token_id, tok.sop_token_id]
        assert max(ids) < len(tok) == 200 and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # no byte_fallback in a 200-piece model (256 byte pieces would not fit): unseen characters are <unk>
    assert tok("ζ✓")["input_ids"][:-2].count(tok.unk_token_id) >= 1
    blank = tok("北京是[MASK]的首都", return_tensors="pt")
    assert tok.mask_token_id in blank["input_ids"][0].tolist()
    out = tok.build_inputs_for_generation(blank, targets="中国")
    assert out["labels"][0, -1] == tok.eop_token_id
    GLMTokenizer.register_for_auto_class("AutoTokenizer")
    tok.save_pretrained(tmp_path / "saved")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert again("the model\n  fills")["input_ids"] == tok("the model\n  fills")["input_ids"]
    assert again.flavour == "chatglm" and again.pad_token_id == 3


def test_num_image_tokens_shift_ids(tiny_sp_model):
    """Pre-"slim" ChatGLM checkpoints put image tokens in front: every text id moves up by num_image_tokens."""
    plain = GLMTokenizer(str(tiny_sp_model))
    shifted = GLMTokenizer(str(tiny_sp_model), num_image_tokens=7)
    text = "the model fills 北京的首都\n  code"
    assert shifted(text)["input_ids"] == [i + 7 for i in plain(text)["input_ids"]]
    assert len(shifted) == len(plain) + 7 and shifted.convert_ids_to_tokens(3) == "<image_3>"
    assert shifted.decode([3] + shifted(text)["input_ids"]) == text  # image ids decode to nothing


def test_new_sentencepiece_model_missing_pieces_named(tmp_path):
    import sentencepiece as spm

    (tmp_path / "c.txt").write_text("\n".join(f"line {i} of text" for i in range(200)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "m"), vocab_size=30, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"\[MASK\].*module docstring"):
        GLMTokenizer(str(tmp_path / "m.model"), flavour="chatglm")


# ----------------------------------------------------------------------------- conversion of a THUDM folder
def test_convert_chatglm_tokenizer_folder(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from converters.tokenizer_files import convert_chatglm_tokenizer

    src, out = tmp_path / "chatglm-6b", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "ice_text.model").symlink_to(TOKENIZER_DATA / "ice_text.model")
    thudm_config = {"bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]"}
    thudm_config.update(mask_token="[MASK]", pad_token="<pad>", unk_token="<unk>", num_image_tokens=0)
    thudm_config.update(tokenizer_class="ChatGLMTokenizer", remove_space=False, do_lower_case=False)
    (src / "tokenizer_config.json").write_text(json.dumps(thudm_config))
    (src / "config.json").write_text(json.dumps({"bos_token_id": 130004, "max_sequence_length": 2048}))
    written = convert_chatglm_tokenizer(src, out)
    assert {"tokenizer.model", "tokenizer_config.json"} | TOKENIZER_CODE <= set(written)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    case = GOLDEN["chatglm"]["cases"][16]
    assert tok(case["text"])["input_ids"] == case["ids_gmask_special"]
    assert tok.model_max_length == 2048
    (src / "config.json").write_text(json.dumps({"bos_token_id": 150004}))
    with pytest.raises(ValueError, match="bos_token_id=150004"):
        convert_chatglm_tokenizer(src, tmp_path)


# ----------------------------------------------------------------------------- decoding pinned to the references
DECODE_CORPUS = """
    import json, sys
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    cases = json.load(open(sys.argv[2], encoding="utf-8"))
    print(json.dumps([[tok.decode(c["ids"]), tok.decode(c["ids"], clean_up_tokenization_spaces=False)] for c in cases]))
"""


def _thudm_folder(src: Path, flavour: str) -> list[dict]:
    """A THUDM/GLM hub-style tokenizer folder (its tokenizer_config.json has no clean_up_tokenization_spaces, as
    the real ones) for `flavour`, and the golden cases of that reference."""
    src.mkdir()
    if flavour == "chatglm":
        (src / "ice_text.model").symlink_to(TOKENIZER_DATA / "ice_text.model")
        config = {"tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0, "bos_token": "<sop>"}
        cases = GOLDEN["chatglm"]["cases"]
    elif flavour == "glm-chinese":
        (src / "cog-pretrain.model").symlink_to(TOKENIZER_DATA / "cog-pretrain.model")
        config, cases = {"tokenizer_class": "GLMChineseTokenizer"}, GOLDEN["glm_chinese"]["cases"]
    else:
        (src / "vocab.json").symlink_to(TOKENIZER_DATA / "gpt2-vocab.json")
        (src / "merges.txt").symlink_to(TOKENIZER_DATA / "gpt2-merges.txt")
        config, cases = GOLDEN_EN["tokenizer_config"], GOLDEN_EN["cases"]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    return cases


@pytest.mark.parametrize("flavour", ["chatglm", "glm-chinese", "glm-english"])
def test_converted_folders_decode_like_the_references(tmp_path, flavour):
    """The converter writes the references' clean-up setting explicitly; a converted folder loaded through
    AutoTokenizer (fresh process, this transformers version; CI runs both) decodes the whole golden corpus exactly as
    THUDM's/GLM's tokenizers did under transformers 4.33, with and without clean-up."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from converters.tokenizer_files import convert_chatglm_tokenizer, convert_glm_tokenizer

    cases = _thudm_folder(tmp_path / "src", flavour)
    (tmp_path / "out").mkdir()
    convert = convert_chatglm_tokenizer if flavour == "chatglm" else convert_glm_tokenizer
    convert(tmp_path / "src", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is True
    (tmp_path / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    got = json.loads(run_fresh(DECODE_CORPUS, tmp_path / "out", tmp_path / "cases.json"))
    expected = [[c["decoded_default"], c["decoded"]] for c in cases]
    assert not _mismatches((c["text"], g, e) for c, g, e in zip(cases, got, expected))
    assert any(c["decoded"] != c["decoded_default"] for c in cases)  # the corpus exercises the clean-up


def test_clean_up_needs_no_base_class_helper(monkeypatch, chatglm):
    """transformers 5.0.0 has no PreTrainedTokenizerBase.clean_up_tokenization: decoding must not need it."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    monkeypatch.delattr(PreTrainedTokenizerBase, "clean_up_tokenization", raising=False)
    for c in GOLDEN["chatglm"]["cases"]:
        assert chatglm.decode(c["ids"], clean_up_tokenization_spaces=True) == c["decoded_default"], c["text"]
    assert chatglm.clean_up_tokenization("a , b ! it 's") == "a, b! it's"


def test_added_tokens_fallback_to_the_public_properties(monkeypatch):
    """Should a transformers release rename its private added-token caches, the public properties are used."""
    tokenization_glm = repo_module("tokenization_glm")
    tok = GLMTokenizer(str(TOKENIZER_DATA / "ice_text.model"), flavour="chatglm")
    tok.add_tokens(["<added_tok>"])
    texts = [c["text"] for c in GOLDEN["chatglm"]["cases"]] + ["x <added_tok> y"]
    before = [(tok(t)["input_ids"], tok.decode(tok(t)["input_ids"])) for t in texts]
    monkeypatch.setattr(tokenization_glm, "ADDED_TOKENS_ATTRIBUTES", ("_no_such_encoder", "_no_such_decoder"))
    assert tok._added_tokens()[0] == tok.added_tokens_encoder  # the fallback is really taken
    assert [(tok(t)["input_ids"], tok.decode(tok(t)["input_ids"])) for t in texts] == before


def test_lone_control_token_decodes_to_its_text(chatglm, glmzh, glmen):
    """lm-eval's `--model hf` takes decode(eos_id) as a stop string (and decode(bos_id) as a prefix test); THUDM's
    decode gives "" for ChatGLM's control pieces, which stops every generation after one token. Ours gives the
    token's text for one special token alone; decoding anything else keeps THUDM's output (golden tests above)."""
    for token, reference in GOLDEN["chatglm"]["lone"].items():
        assert reference["decoded"] == "" and reference["decoded_int"] == ""  # THUDM's
        i = reference["id"]
        assert chatglm.decode([i]) == chatglm.decode(i) == chatglm.decode(torch.tensor([i])) == token
        assert chatglm.decode([i], skip_special_tokens=True) == ""
        assert chatglm.decode([i, i]) == ""  # not alone: THUDM's output
    for tok in (chatglm, glmzh, glmen):
        stop = tok.decode(tok.eos_token_id, skip_special_tokens=False)
        assert stop and stop == tok.eos_token
        assert tok.decode(tok.eop_token_id) == tok.eop_token
        assert not "你好".startswith(tok.decode(tok.sop_token_id))
        ids = tok("Hello , world !")["input_ids"]
        assert stop not in tok.decode(ids, skip_special_tokens=True)


def test_clean_up_setting_is_saved_and_honoured(tmp_path, chatglm):
    """The init argument is stored in tokenizer_config.json and wins over transformers' default on reload; the
    class default (and the repository's own default model) keep it off, so decode reverses encode."""
    assert chatglm.clean_up_tokenization_spaces is False
    assert json.loads((REPO_ROOT / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    tok = GLMTokenizer(str(TOKENIZER_DATA / "ice_text.model"), clean_up_tokenization_spaces=True)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is True
    again = GLMTokenizer.from_pretrained(tmp_path)
    ids = again("Hello , world !")["input_ids"]
    assert again.decode(ids) == "Hello, world!" and chatglm.decode(ids) == "Hello , world !"


def test_torch_tensors_keep_device_and_dtype(glmzh):
    enc = glmzh(["[gMASK] 你好"], return_tensors="pt")
    out = glmzh.build_inputs_for_generation(enc, targets=["世界"])
    assert all(v.dtype == torch.long for v in out.values())
