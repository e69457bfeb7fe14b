"""Bad input at every public entry point gets a TypeError / ValueError that names the argument.

One table, one row per bad case: (id, a callable building the bad call, the exception type, a regex the message must
match). It covers each model's `forward` and `generate` (GLM in both variants, BART-gen, sparse GPT-2), the configs,
the tokenizer and the convert command, and is checked to stay above 40 rows covering all of them. A deep
`IndexError` / `RuntimeError` from torch, a hang or a silent wrong answer all fail a row: `pytest.raises` accepts
only the named type, and a call that returns is a failure.

Chosen behaviour for inputs that would otherwise give a *silently wrong* output (rather than a crash):
- right padding for generation (GLM, sparse GPT-2): an error, since the first new token would be predicted from a
  padding position; BART's encoder reads right-padded input correctly, so BART accepts it;
- a 0/1 padding mask holding other values, or a row of padding only: an error (positions counted from the mask and
  a softmax over no key are meaningless);
- GLM: a blank or `<sop>` id inside the padding is padding, not a blank (tested below to give the same logits as
  the same row padded with `<pad>`); a row whose only blank is in the padding is an error ("no blank token").

Related bad-input tests elsewhere (not repeated here): tests/test_glm_model.py (missing blank / `<sop>`, ids past
the vocabulary, sequences past max_sequence_length, malformed position ids and masks, tuple caches),
tests/test_bart_gen.py, tests/test_gpt2_sparse.py (sparse-attention settings), tests/test_tokenizer.py (missing and
non-SentencePiece vocab files), tests/test_convert_common.py (damaged checkpoint files given to the converter).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fixtures import (
    BART_IDS,
    BART_TINY,
    BART_VOCAB,
    GLM_PROMPT,
    GLM_TINY,
    GLM_VARIANTS,
    GLM_VOCAB,
    GMASK,
    MASK,
    PAD,
    SOP,
    SPARSE_IDS,
    SPARSE_TINY,
    SPARSE_VOCAB,
    bart_config,
    bart_model,
    glm_class,
    glm_config,
    glm_model,
    sparse_config,
    sparse_model,
    tokenizer,
)
from helpers import REPO_ROOT, assert_close

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import convert_checkpoint  # noqa: E402

GREEDY = dict(max_new_tokens=2, do_sample=False)
Row = tuple[str, Callable[[Path], object], type, str]


def glm_ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(list(rows) or [GLM_PROMPT])


def convert_command(*argv: str) -> None:
    """Run scripts/convert_checkpoint.py's `main` in-process; a failed conversion (exit status 2) is re-raised as a
    ValueError carrying what the command printed, so that the table can check the message."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = convert_checkpoint.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse: unknown choice, missing argument
            status = exit_.code
    if status != 0:
        raise ValueError(f"exit status {status}: {stderr.getvalue().strip()}")


def folder(tmp: Path, name: str, files: dict[str, str] | None = None) -> Path:
    path = tmp / name
    path.mkdir()
    for file, text in (files or {}).items():
        (path / file).write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------- GLM
def glm_rows(variant: str) -> list[Row]:
    """Bad calls of GLM's forward and generate that fail the same way in both variants."""

    def fwd(**kwargs):
        return lambda tmp: glm_model(variant)(**kwargs)

    def gen(*args, **kwargs):
        return lambda tmp: glm_model(variant).generate(*args, **kwargs, **GREEDY)

    p = f"glm[{variant}]"
    return [
        (f"{p}.forward float ids", fwd(input_ids=glm_ids().float()), TypeError, r"input_ids .*integer.*float32"),
        (f"{p}.forward 1-D ids", fwd(input_ids=torch.tensor(GLM_PROMPT)), ValueError, r"input_ids .*\[batch, seq\]"),
        (f"{p}.forward empty batch", fwd(input_ids=glm_ids()[:0]), ValueError, r"input_ids is empty"),
        (f"{p}.forward empty sequence", fwd(input_ids=glm_ids()[:, :0]), ValueError, r"input_ids is empty"),
        (f"{p}.forward no blank token", fwd(input_ids=glm_ids([5, 6, 7, SOP])), ValueError, r"\[0\]: no blank token"),
        (f"{p}.forward id past vocab", fwd(input_ids=glm_ids([5, GLM_VOCAB, GMASK, SOP])), ValueError, r"input_ids"),
        (
            f"{p}.forward past max_sequence_length",
            fwd(input_ids=glm_ids([5] * 70 + [GMASK, SOP])),
            ValueError,
            r"max_sequence_length=64",
        ),
        (
            f"{p}.forward NaN inputs_embeds",
            fwd(inputs_embeds=torch.full((1, 5, 32), float("nan")), position_ids=torch.zeros(1, 2, 5).long()),
            ValueError,
            r"inputs_embeds holds NaN or inf",
        ),
        (
            f"{p}.forward inputs_embeds wrong width",
            fwd(inputs_embeds=torch.zeros(1, 5, 16), position_ids=torch.zeros(1, 2, 5).long()),
            ValueError,
            r"inputs_embeds .*hidden_size=32",
        ),
        (
            f"{p}.forward mask batch differs from ids",
            fwd(input_ids=glm_ids(), attention_mask=torch.ones(2, 5)),
            ValueError,
            r"attention_mask must be",
        ),
        (
            f"{p}.forward mask not 0/1",
            fwd(input_ids=glm_ids(), attention_mask=torch.tensor([[2, 1, 1, 1, 1]])),
            ValueError,
            r"attention_mask must hold 0/1",
        ),
        (
            f"{p}.forward float position_ids",
            fwd(input_ids=glm_ids(), position_ids=torch.zeros(1, 2, 5)),
            TypeError,
            r"position_ids must be an integer",
        ),
        (
            f"{p}.forward labels of another shape",
            fwd(input_ids=glm_ids(), labels=torch.tensor([[1, 2, 3]])),
            ValueError,
            r"labels must have the shape of input_ids",
        ),
        (
            f"{p}.forward labels past vocab",
            fwd(input_ids=glm_ids(), labels=torch.tensor([[1, 2, 3, 4, 500]])),
            ValueError,
            r"labels hold 500",
        ),
        (f"{p}.generate 1-D ids", gen(torch.tensor(GLM_PROMPT)), ValueError, r"input_ids .*\[batch, seq\]"),
        (f"{p}.generate float ids", gen(glm_ids().float()), TypeError, r"input_ids .*integer"),
        (f"{p}.generate empty batch", gen(glm_ids()[:0]), ValueError, r"input_ids is empty"),
        (
            f"{p}.generate mask shape differs from ids",
            gen(glm_ids(), attention_mask=torch.ones(1, 4, dtype=torch.long)),
            ValueError,
            r"attention_mask has shape \[1, 4\], but input_ids",
        ),
        (
            f"{p}.generate right padding",
            gen(
                glm_ids(GLM_PROMPT, [5, GMASK, SOP, PAD, PAD]), attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
            ),
            ValueError,
            r"right-padded.*padding_side = 'left'",
        ),
        (
            f"{p}.generate past max_sequence_length",
            lambda tmp: glm_model(variant).generate(glm_ids([5] * 61 + [GMASK, SOP]), max_new_tokens=4),
            ValueError,
            r"max_sequence_length=64",
        ),
        (
            f"{p}.generate inputs_embeds only",
            gen(inputs_embeds=torch.zeros(1, 5, 32)),
            ValueError,
            r"needs input_ids .*not inputs_embeds",
        ),
    ]


CHATGLM_ROWS: list[Row] = [
    (
        "glm[chatglm].forward blank only in the padding",
        lambda tmp: glm_model()(glm_ids([GMASK, 5, 6, 7, SOP]), attention_mask=torch.tensor([[0, 1, 1, 1, 1]])),
        ValueError,
        r"input_ids row\(s\) \[0\]: no blank token",
    ),
    (
        "glm[chatglm].forward row of padding only",
        lambda tmp: glm_model()(glm_ids(GLM_PROMPT, GLM_PROMPT), attention_mask=torch.tensor([[1] * 5, [0] * 5])),
        ValueError,
        r"input_ids row\(s\) \[1\]: no <sop>",
    ),
    (
        "glm[chatglm].generate no <sop>",
        lambda tmp: glm_model().generate(glm_ids([5, 6, GMASK]), **GREEDY),
        ValueError,
        r"input_ids row\(s\) \[0\]: no <sop>",
    ),
]

GLM_CONFIG_ROWS: list[Row] = [
    ("glm.config heads do not divide", lambda tmp: glm_config(num_attention_heads=5), ValueError, r"hidden_size"),
    ("glm.config unknown variant", lambda tmp: glm_config(variant="glm4"), ValueError, r"GLMConfig.variant"),
    ("glm.config float size", lambda tmp: glm_config(hidden_size=32.0), ValueError, r"GLMConfig.hidden_size"),
    (
        "glm.config dropout of 1",
        lambda tmp: glm_config(attention_dropout_prob=1.0),
        ValueError,
        r"attention_dropout_prob",
    ),
    ("glm.config pad is a blank", lambda tmp: glm_config(pad_token_id=GMASK), ValueError, r"pad_token_id \(121\)"),
    ("glm.config eos is bos", lambda tmp: glm_config(eos_token_id=SOP), ValueError, r"eos_token_id \(124\)"),
    ("glm.config blank past vocab", lambda tmp: glm_config(mask_token_id=GLM_VOCAB), ValueError, r"mask_token_id"),
]

# ---------------------------------------------------------------------------------------------------------- tokenizer
TOKENIZER_ROWS: list[Row] = [
    ("tokenizer.__call__ None", lambda tmp: tokenizer()(None), (TypeError, ValueError), r"text|[Ii]nput"),
    ("tokenizer.tokenize bytes", lambda tmp: tokenizer().tokenize(b"abc"), TypeError, r"text must be a str"),
    (
        "tokenizer.__call__ lone surrogate",
        lambda tmp: tokenizer()("a\ud800b"),
        ValueError,
        r"text is not valid Unicode.*index 1",
    ),
    ("tokenizer.decode id past vocab", lambda tmp: tokenizer().decode([10**9]), ValueError, r"token id 1000000000"),
    ("tokenizer.decode negative id", lambda tmp: tokenizer().decode([-1]), ValueError, r"token id -1"),
    ("tokenizer.decode strings", lambda tmp: tokenizer().decode(["a"]), TypeError, r"token_ids must hold integer"),
    ("tokenizer.decode float ids", lambda tmp: tokenizer().decode([1.5]), TypeError, r"token_ids must hold integer"),
    (
        "tokenizer.build_inputs_for_generation no blank",
        lambda tmp: tokenizer().build_inputs_for_generation(tokenizer()("no blank here", add_special_tokens=False)),
        ValueError,
        r"row 0 has no blank token",
    ),
    (
        "tokenizer.build_inputs_for_generation max_gen_length 0",
        lambda tmp: tokenizer().build_inputs_for_generation(tokenizer()("a [MASK] b"), max_gen_length=0),
        ValueError,
        r"max_gen_length=0",
    ),
    (
        "tokenizer.__init__ unknown flavour",
        lambda tmp: type(tokenizer())(tokenizer().vocab_file, flavour="glm-klingon"),
        ValueError,
        r"flavour='glm-klingon'",
    ),
    (
        "tokenizer.__init__ JSON as vocab_file",
        lambda tmp: type(tokenizer())(str(folder(tmp, "v", {"tokenizer.model": "{}"}) / "tokenizer.model")),
        ValueError,
        r"vocab_file=.*not a SentencePiece model",
    ),
]


# --------------------------------------------------------------------------------------------------------------- BART
def bart_fwd(**kwargs):
    return lambda tmp: bart_model()(**kwargs)


def bart_gen(*args, **kwargs):
    return lambda tmp: bart_model().generate(*args, **kwargs, **GREEDY)


BART_ROWS: list[Row] = [
    ("bart.forward float ids", bart_fwd(input_ids=BART_IDS.float()), TypeError, r"input_ids must be an integer"),
    ("bart.forward 1-D ids", bart_fwd(input_ids=BART_IDS[0]), ValueError, r"input_ids must have a non-empty shape"),
    ("bart.forward empty batch", bart_fwd(input_ids=BART_IDS[:0]), ValueError, r"input_ids must have a non-empty"),
    ("bart.forward id past vocab", bart_fwd(input_ids=torch.tensor([[0, BART_VOCAB]])), ValueError, r"input_ids"),
    (
        "bart.forward mask longer than ids",
        bart_fwd(input_ids=BART_IDS, attention_mask=torch.ones(1, 5, dtype=torch.long)),
        ValueError,
        r"attention_mask must have shape \[batch, length\] = \[1, 4\]",
    ),
    (
        "bart.forward mask not 0/1",
        bart_fwd(input_ids=BART_IDS, attention_mask=torch.tensor([[2, 1, 1, 1]])),
        ValueError,
        r"must hold 0/1",
    ),
    (
        "bart.forward row of padding only",
        bart_fwd(input_ids=BART_IDS, attention_mask=torch.zeros(1, 4, dtype=torch.long)),
        ValueError,
        r"row of padding only",
    ),
    (
        "bart.forward decoder mask batch differs",
        bart_fwd(input_ids=BART_IDS, decoder_input_ids=BART_IDS, decoder_attention_mask=torch.ones(2, 4)),
        ValueError,
        r"decoder_attention_mask must have shape",
    ),
    (
        "bart.forward NaN inputs_embeds",
        bart_fwd(inputs_embeds=torch.full((1, 4, 32), float("nan")), decoder_input_ids=BART_IDS),
        ValueError,
        r"inputs_embeds holds NaN or inf",
    ),
    (
        "bart.forward inf decoder_inputs_embeds",
        bart_fwd(input_ids=BART_IDS, decoder_inputs_embeds=torch.full((1, 4, 32), float("inf"))),
        ValueError,
        r"decoder_inputs_embeds holds NaN or inf",
    ),
    (
        "bart.forward encoder_outputs wrong width",
        bart_fwd(encoder_outputs=(torch.zeros(1, 4, 16),), decoder_input_ids=BART_IDS),
        ValueError,
        r"encoder_outputs must be \[batch=1, source length, d_model=32\]",
    ),
    (
        "bart.forward labels of another shape",
        bart_fwd(input_ids=BART_IDS, decoder_input_ids=BART_IDS, labels=torch.tensor([[5, 6]])),
        ValueError,
        r"labels must have the decoder's shape",
    ),
    ("bart.forward float labels", bart_fwd(input_ids=BART_IDS, labels=BART_IDS.float()), TypeError, r"labels"),
    ("bart.generate 1-D ids", bart_gen(BART_IDS[0]), ValueError, r"input_ids must have a non-empty shape"),
    ("bart.generate float ids", bart_gen(BART_IDS.float()), TypeError, r"input_ids must be an integer"),
    (
        "bart.generate mask shape differs from ids",
        bart_gen(BART_IDS, attention_mask=torch.ones(1, 5, dtype=torch.long)),
        ValueError,
        r"attention_mask must have shape",
    ),
    (
        "bart.generate past max_position_embeddings",
        lambda tmp: bart_model().generate(BART_IDS, max_new_tokens=60, min_new_tokens=60),
        ValueError,
        r"max_position_embeddings is 40",
    ),
    ("bart.config zero heads", lambda tmp: bart_config(encoder_attention_heads=0), ValueError, r"encoder_attention"),
    ("bart.config negative layers", lambda tmp: bart_config(decoder_layers=-1), ValueError, r"decoder_layers"),
    (
        "bart.config unknown activation",
        lambda tmp: bart_config(activation_function="swishy"),
        ValueError,
        r"activation_function='swishy'",
    ),
    ("bart.config pad past vocab", lambda tmp: bart_config(pad_token_id=500), ValueError, r"pad_token_id=500"),
    ("bart.config dropout 1.5", lambda tmp: bart_config(dropout=1.5), ValueError, r"dropout must be a probability"),
]


# ------------------------------------------------------------------------------------------------------- sparse GPT-2
def sparse_fwd(**kwargs):
    return lambda tmp: sparse_model()(**kwargs)


SPARSE_ROWS: list[Row] = [
    ("sparse.forward float ids", sparse_fwd(input_ids=SPARSE_IDS.float()), TypeError, r"input_ids must be an int"),
    ("sparse.forward 1-D ids", sparse_fwd(input_ids=SPARSE_IDS[0]), ValueError, r"input_ids must have a non-empty"),
    ("sparse.forward empty sequence", sparse_fwd(input_ids=SPARSE_IDS[:, :0]), ValueError, r"input_ids must have"),
    ("sparse.forward id past vocab", sparse_fwd(input_ids=torch.tensor([[1, SPARSE_VOCAB]])), ValueError, r"vocab"),
    (
        "sparse.forward past max_position_embeddings",
        sparse_fwd(input_ids=torch.randint(0, 100, (1, 97))),
        ValueError,
        r"max_position_embeddings=96",
    ),
    (
        "sparse.forward NaN inputs_embeds",
        sparse_fwd(inputs_embeds=torch.full((1, 8, 32), float("nan"))),
        ValueError,
        r"inputs_embeds holds NaN or inf",
    ),
    (
        "sparse.forward mask not 0/1",
        sparse_fwd(input_ids=SPARSE_IDS, attention_mask=torch.full((1, 8), 2)),
        ValueError,
        r"attention_mask must hold 0/1",
    ),
    (
        "sparse.forward row of padding only",
        sparse_fwd(input_ids=SPARSE_IDS, attention_mask=torch.zeros(1, 8, dtype=torch.long)),
        ValueError,
        r"attention_mask has a row of padding only",
    ),
    (
        "sparse.forward negative position_ids",
        sparse_fwd(input_ids=SPARSE_IDS, position_ids=torch.full((1, 8), -1)),
        ValueError,
        r"position_ids must lie in \[0, max_position_embeddings=96\)",
    ),
    ("sparse.forward negative sep", sparse_fwd(input_ids=SPARSE_IDS, sep=-3), ValueError, r"sep must be"),
    ("sparse.forward is_sparse 'dense'", sparse_fwd(input_ids=SPARSE_IDS, is_sparse="dense"), TypeError, r"is_sparse"),
    ("sparse.forward is_sparse 3", sparse_fwd(input_ids=SPARSE_IDS, is_sparse=3), ValueError, r"is_sparse must be 0"),
    (
        "sparse.forward is_sparse=1 length not a window multiple",
        sparse_fwd(input_ids=torch.randint(0, 100, (1, 18)), is_sparse=1),
        ValueError,
        r"multiple of query_window",
    ),
    (
        "sparse.forward pivot_idx past the keys",
        sparse_fwd(input_ids=torch.randint(0, 100, (1, 16)), is_sparse=1, pivot_idx=torch.tensor([[0, 16]])),
        ValueError,
        r"pivot_idx holds key positions",
    ),
    (
        "sparse.forward mems that are not tensors",
        sparse_fwd(input_ids=SPARSE_IDS, mems=[1, 2]),
        ValueError,
        r"every mems tensor must have shape",
    ),
    (
        "sparse.forward labels past vocab",
        sparse_fwd(input_ids=SPARSE_IDS, labels=torch.full((1, 8), 500)),
        ValueError,
        r"labels hold 500",
    ),
    (
        "sparse.generate right padding",
        lambda tmp: sparse_model().generate(
            torch.tensor([[110, 111, 0, 0]]), attention_mask=torch.tensor([[1, 1, 0, 0]]), **GREEDY
        ),
        ValueError,
        r"right-padded",
    ),
    ("sparse.generate float ids", lambda tmp: sparse_model().generate(SPARSE_IDS.float(), **GREEDY), TypeError, r"ids"),
    (
        "sparse.generate empty batch",
        lambda tmp: sparse_model().generate(SPARSE_IDS[:0], **GREEDY),
        ValueError,
        r"input_ids must have a non-empty shape",
    ),
    ("sparse.config zero window", lambda tmp: sparse_config(query_window=0), ValueError, r"query_window"),
    ("sparse.config negative eps", lambda tmp: sparse_config(layernorm_epsilon=-1.0), ValueError, r"layernorm_eps"),
    ("sparse.config dropout str", lambda tmp: sparse_config(hidden_dropout="0.1"), ValueError, r"hidden_dropout"),
    (
        "sparse.config is_sparse=1 window longer than positions",
        lambda tmp: sparse_config(is_sparse=1, max_position_embeddings=6),
        ValueError,
        r"is_sparse=1 .*max_position_embeddings \(6\)",
    ),
    (
        "sparse.config image tokens past vocab",
        lambda tmp: sparse_config(num_image_tokens=SPARSE_VOCAB + 1),
        ValueError,
        r"num_image_tokens",
    ),
]

# ---------------------------------------------------------------------------------------------------- convert command
CONVERT_ROWS: list[Row] = [
    (
        "convert --dtype float8",
        lambda tmp: convert_command("--arch", "gpt2", "--src", tmp, "--dst", tmp / "out", "--dtype", "float8"),
        ValueError,
        r"argument --dtype: invalid choice: 'float8'",
    ),
    (
        "convert --src missing",
        lambda tmp: convert_command("--arch", "gpt2", "--src", tmp / "nope", "--dst", tmp / "out"),
        ValueError,
        r"--src .*nope is not a folder",
    ),
    (
        "convert --dst not empty",
        lambda tmp: convert_command("--arch", "gpt2", "--src", tmp, "--dst", folder(tmp, "full", {"x": "x"})),
        ValueError,
        r"--dst .*full exists and is not empty",
    ),
    (
        "convert cogview without --num-attention-heads",
        lambda tmp: convert_command("--arch", "cogview", "--src", tmp, "--dst", tmp / "out"),
        ValueError,
        r"--arch cogview needs --num-attention-heads",
    ),
    (
        "convert chatglm-6b without config.json",
        lambda tmp: convert_command("--arch", "chatglm-6b", "--src", tmp, "--dst", tmp / "out"),
        ValueError,
        r"expected config.json in",
    ),
    (
        "convert bart given a GPT-2 checkpoint",
        lambda tmp: convert_command(
            "--arch", "bart", "--src", folder(tmp, "g", {"config.json": '{"model_type": "gpt2"}'}), "--dst", tmp / "o"
        ),
        ValueError,
        r"model_type 'gpt2'; --arch bart expects",
    ),
    (
        "convert config.json not JSON",
        lambda tmp: convert_command(
            "--arch", "gpt2", "--src", folder(tmp, "b", {"config.json": "{not json"}), "--dst", tmp / "o"
        ),
        ValueError,
        r"config.json is not valid JSON",
    ),
]

# -------------------------------------------------------------- issue 23, second round: kinds refused by model_checks
# Every family that takes the input gets a row: ids of another integer width or a float/bool dtype, Python lists
# where tensors are expected, embeddings (or BART's encoder output) in another dtype than the model, both ids and
# embeddings given to generate(), GLM's negative `sep`, GLM's [B, 2, L] positions given to sparse GPT-2, a
# multi-element `is_sparse` and per-layer `mems` that disagree.
BF16 = torch.bfloat16


def glm_more_rows(variant: str) -> list[Row]:
    def fwd(**kwargs):
        return lambda tmp: glm_model(variant)(**kwargs)

    def gen(*args, **kwargs):
        return lambda tmp: glm_model(variant).generate(*args, **kwargs, **GREEDY)

    p = f"glm[{variant}]"
    ids = glm_ids()
    return [
        (f"{p}.forward negative sep", fwd(input_ids=ids, attention_mask=-1), ValueError, r"attention_mask must be one"),
        (
            f"{p}.forward negative sep per row",
            fwd(input_ids=glm_ids(GLM_PROMPT, GLM_PROMPT), attention_mask=torch.tensor([2, -1])),
            ValueError,
            r"attention_mask must be one prefix length >= 0",
        ),
        (f"{p}.forward int16 ids", fwd(input_ids=ids.short()), TypeError, r"input_ids .*got dtype torch.int16"),
        (f"{p}.forward bool ids", fwd(input_ids=ids.bool()), TypeError, r"input_ids .*got dtype torch.bool"),
        (f"{p}.forward list ids", fwd(input_ids=[GLM_PROMPT]), TypeError, r"input_ids must be a torch.Tensor"),
        (
            f"{p}.forward bf16 inputs_embeds",
            fwd(inputs_embeds=torch.zeros(1, 5, 32, dtype=BF16), position_ids=torch.zeros(1, 2, 5).long()),
            TypeError,
            r"inputs_embeds has dtype torch.bfloat16 but the model runs in torch.float32",
        ),
        (
            f"{p}.forward list position_ids",
            fwd(input_ids=ids, position_ids=[[[0] * 5, [0] * 5]]),
            TypeError,
            r"position_ids must be a torch.Tensor",
        ),
        (
            f"{p}.forward list attention_mask",
            fwd(input_ids=ids, attention_mask=[[1] * 5]),
            ValueError,
            r"attention_mask must be a tensor or GLM's prefix length",
        ),
        (f"{p}.forward list labels", fwd(input_ids=ids, labels=[[1] * 5]), TypeError, r"labels must be a torch.Tensor"),
        (f"{p}.forward int16 labels", fwd(input_ids=ids, labels=ids.short()), TypeError, r"labels must be an integer"),
        (f"{p}.generate int16 ids", gen(ids.short()), TypeError, r"input_ids .*got dtype torch.int16"),
        (f"{p}.generate list ids", gen([GLM_PROMPT]), TypeError, r"input_ids must be a torch.Tensor"),
        (
            f"{p}.generate ids and inputs_embeds",
            gen(ids, inputs_embeds=torch.zeros(1, 5, 32)),
            ValueError,
            r"pass input_ids or inputs_embeds to generate\(\), not both",
        ),
        (
            f"{p}.generate list attention_mask",
            gen(ids, attention_mask=[[1] * 5]),
            TypeError,
            r"attention_mask must be a torch.Tensor",
        ),
    ]


BART_MORE_ROWS: list[Row] = [
    ("bart.forward int16 ids", bart_fwd(input_ids=BART_IDS.short()), TypeError, r"input_ids .*got dtype torch.int16"),
    ("bart.forward list ids", bart_fwd(input_ids=BART_IDS.tolist()), TypeError, r"input_ids must be a torch.Tensor"),
    (
        "bart.forward bf16 inputs_embeds",
        bart_fwd(inputs_embeds=torch.zeros(1, 4, 32, dtype=BF16), decoder_input_ids=BART_IDS),
        TypeError,
        r"inputs_embeds has dtype torch.bfloat16",
    ),
    (
        "bart.forward bf16 encoder_outputs",
        bart_fwd(encoder_outputs=(torch.zeros(1, 4, 32, dtype=BF16),), decoder_input_ids=BART_IDS),
        TypeError,
        r"encoder_outputs has dtype torch.bfloat16",
    ),
    (
        "bart.forward list encoder_outputs",
        bart_fwd(encoder_outputs=([[0.0] * 32] * 4,), decoder_input_ids=BART_IDS),
        TypeError,
        r"encoder_outputs must be a torch.Tensor",
    ),
    (
        "bart.forward int16 decoder_input_ids",
        bart_fwd(input_ids=BART_IDS, decoder_input_ids=BART_IDS.short()),
        TypeError,
        r"decoder_input_ids .*got dtype torch.int16",
    ),
    (
        "bart.forward list decoder_input_ids",
        bart_fwd(input_ids=BART_IDS, decoder_input_ids=BART_IDS.tolist()),
        TypeError,
        r"decoder_input_ids must be a torch.Tensor",
    ),
    (
        "bart.forward bf16 decoder_inputs_embeds",
        bart_fwd(input_ids=BART_IDS, decoder_inputs_embeds=torch.zeros(1, 4, 32, dtype=BF16)),
        TypeError,
        r"decoder_inputs_embeds has dtype torch.bfloat16",
    ),
    (
        "bart.forward list attention_mask",
        bart_fwd(input_ids=BART_IDS, attention_mask=[[1] * 4]),
        TypeError,
        r"attention_mask must be a torch.Tensor",
    ),
    (
        "bart.forward ids and inputs_embeds",
        bart_fwd(input_ids=BART_IDS, inputs_embeds=torch.zeros(1, 4, 32), decoder_input_ids=BART_IDS),
        ValueError,
        r"exactly one of input_ids and inputs_embeds",
    ),
    ("bart.forward list labels", bart_fwd(input_ids=BART_IDS, labels=[[5, 6]]), TypeError, r"labels must be a torch"),
    ("bart.generate int16 ids", bart_gen(BART_IDS.short()), TypeError, r"input_ids .*got dtype torch.int16"),
    ("bart.generate list ids", bart_gen(BART_IDS.tolist()), TypeError, r"input_ids must be a torch.Tensor"),
    (
        "bart.generate ids and inputs_embeds",
        bart_gen(BART_IDS, inputs_embeds=torch.zeros(1, 4, 32)),
        ValueError,
        r"pass input_ids or inputs_embeds to generate\(\), not both",
    ),
]


def sparse_gen(*args, **kwargs):
    return lambda tmp: sparse_model().generate(*args, **kwargs, **GREEDY)


def sparse_mems(*shapes_and_dtypes) -> list[torch.Tensor]:
    return [torch.zeros(1, length, 32, dtype=dtype) for length, dtype in shapes_and_dtypes]


SPARSE_MORE_ROWS: list[Row] = [
    ("sparse.forward int16 ids", sparse_fwd(input_ids=SPARSE_IDS.short()), TypeError, r"input_ids .*torch.int16"),
    ("sparse.forward bool ids", sparse_fwd(input_ids=SPARSE_IDS.bool()), TypeError, r"input_ids .*torch.bool"),
    ("sparse.forward list ids", sparse_fwd(input_ids=SPARSE_IDS.tolist()), TypeError, r"input_ids must be a torch"),
    (
        "sparse.forward bf16 inputs_embeds",
        sparse_fwd(inputs_embeds=torch.zeros(1, 8, 32, dtype=BF16)),
        TypeError,
        r"inputs_embeds has dtype torch.bfloat16 but the model runs in torch.float32",
    ),
    (
        "sparse.forward GLM's [B, 2, L] position_ids",
        sparse_fwd(input_ids=SPARSE_IDS, position_ids=torch.zeros(1, 2, 8, dtype=torch.long)),
        ValueError,
        r"position_ids must have shape \[batch, seq\] = \[1, 8\], got \[1, 2, 8\]",
    ),
    (
        "sparse.forward list position_ids",
        sparse_fwd(input_ids=SPARSE_IDS, position_ids=[list(range(8))]),
        TypeError,
        r"position_ids must be a torch.Tensor",
    ),
    (
        "sparse.forward float position_ids",
        sparse_fwd(input_ids=SPARSE_IDS, position_ids=torch.zeros(1, 8)),
        TypeError,
        r"position_ids must be an integer tensor",
    ),
    (
        "sparse.forward multi-element is_sparse",
        sparse_fwd(input_ids=SPARSE_IDS, is_sparse=torch.tensor([0, 1])),
        TypeError,
        r"is_sparse must be an int.*shape \[2\]",
    ),
    (
        "sparse.forward mems of different lengths",
        sparse_fwd(input_ids=SPARSE_IDS, mems=sparse_mems((3, torch.float32), (4, torch.float32))),
        ValueError,
        r"mems must have one length for every layer, got \[3, 4\]",
    ),
    (
        "sparse.forward mems of different dtypes",
        sparse_fwd(input_ids=SPARSE_IDS, mems=sparse_mems((3, torch.float32), (3, BF16))),
        TypeError,
        r"mems must have the model's dtype torch.float32",
    ),
    (
        "sparse.forward too few mems",
        sparse_fwd(input_ids=SPARSE_IDS, mems=sparse_mems((3, torch.float32))),
        ValueError,
        r"mems must hold at least num_layers=2 tensors, got 1",
    ),
    (
        "sparse.forward negative sep per row",
        sparse_fwd(input_ids=SPARSE_IDS, sep=torch.tensor([-2])),
        ValueError,
        r"sep must be one prefix length >= 0",
    ),
    ("sparse.forward float sep", sparse_fwd(input_ids=SPARSE_IDS, sep=2.5), TypeError, r"sep must be an int"),
    (
        "sparse.forward list attention_mask",
        sparse_fwd(input_ids=SPARSE_IDS, attention_mask=[[1] * 8]),
        TypeError,
        r"attention_mask must be a torch.Tensor",
    ),
    ("sparse.forward list labels", sparse_fwd(input_ids=SPARSE_IDS, labels=[[1] * 8]), TypeError, r"labels must be"),
    ("sparse.generate int16 ids", sparse_gen(SPARSE_IDS.short()), TypeError, r"input_ids .*torch.int16"),
    ("sparse.generate list ids", sparse_gen(SPARSE_IDS.tolist()), TypeError, r"input_ids must be a torch.Tensor"),
    (
        "sparse.generate ids and inputs_embeds",
        sparse_gen(SPARSE_IDS, inputs_embeds=torch.zeros(1, 8, 32)),
        ValueError,
        r"pass input_ids or inputs_embeds to generate\(\), not both",
    ),
    (
        "sparse.generate list attention_mask",
        sparse_gen(SPARSE_IDS, attention_mask=[[1] * 8]),
        TypeError,
        r"attention_mask must be a torch.Tensor",
    ),
]


# Config fields set after the config's __init__ (what `from_pretrained(folder, **overrides)` does) are checked again
# when the model is built (`CheckedLoading.__init__` calls `config.check_fields()`).
def changed(config, **fields):
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def reloaded(model, tmp: Path, **overrides):
    """`from_pretrained` of `model` saved to `tmp`, with config `overrides`."""
    model.save_pretrained(tmp / "saved")
    return type(model).from_pretrained(tmp / "saved", **overrides)


CONFIG_OVERRIDE_ROWS: list[Row] = [
    (
        "glm.from_pretrained heads do not divide",
        lambda tmp: reloaded(glm_model(), tmp, num_attention_heads=5),
        ValueError,
        r"GLMConfig.hidden_size \(32\) .*num_attention_heads \(5\)",
    ),
    (
        "glm.model variant changed after __init__",  # not via from_pretrained: its `variant` names a weights file
        lambda tmp: glm_class()(changed(glm_config(), variant="glm4")),
        ValueError,
        r"GLMConfig.variant must be one of",
    ),
    (
        "glm.model config changed after __init__",
        lambda tmp: glm_class()(changed(glm_config(), layernorm_epsilon=0.0)),
        ValueError,
        r"GLMConfig.layernorm_epsilon must be a positive",
    ),
    (
        "sparse.from_pretrained zero window",
        lambda tmp: reloaded(sparse_model(), tmp, query_window=0),
        ValueError,
        r"GPT2SparseConfig.query_window must be a positive integer, got 0",
    ),
    (
        "sparse.from_pretrained heads do not divide",
        lambda tmp: reloaded(sparse_model(), tmp, num_attention_heads=5),
        ValueError,
        r"GPT2SparseConfig.hidden_size \(32\) must be divisible by num_attention_heads \(5\)",
    ),
    (
        "sparse.model config changed after __init__",
        lambda tmp: type(sparse_model())(changed(sparse_config(), is_sparse=7)),
        ValueError,
        r"GPT2SparseConfig.is_sparse must be 0",
    ),
    (
        "bart.from_pretrained heads do not divide",
        lambda tmp: reloaded(bart_model(), tmp, decoder_attention_heads=5),
        ValueError,
        r"d_model \(32\) must be divisible .*decoder_attention_heads \(5\)",
    ),
    (
        "bart.from_pretrained dropout 1.5",
        lambda tmp: reloaded(bart_model(), tmp, dropout=1.5),
        ValueError,
        r"dropout must be a probability in \[0, 1\), got 1.5",
    ),
    (
        "bart.model config changed after __init__",
        lambda tmp: type(bart_model())(changed(bart_config(), activation_function="swishy")),
        ValueError,
        r"activation_function='swishy'",
    ),
]


def convert_with_config(arch: str, config_text: str, *extra: str):
    """The convert command on a folder whose config.json is `config_text` (valid JSON, not an object)."""
    return lambda tmp: convert_command(
        "--arch", arch, "--src", folder(tmp, "s", {"config.json": config_text}), "--dst", tmp / "o", *extra
    )


# one line on stderr (no traceback: an uncaught exception would escape convert_command with its own type)
NOT_AN_OBJECT = (
    r"^exit status 2: convert_checkpoint\.py: error: [^\n]*config\.json must hold a JSON object[^\n]*got {}\Z"
)
CONVERT_JSON_ROWS: list[Row] = [
    (
        "convert gpt2 config.json a JSON array",
        convert_with_config("gpt2", "[1, 2]"),
        ValueError,
        NOT_AN_OBJECT.format("an array"),
    ),
    (
        "convert bart config.json a JSON array",
        convert_with_config("bart", "[]"),
        ValueError,
        NOT_AN_OBJECT.format("an array"),
    ),
    (
        "convert glm config.json a JSON array",
        convert_with_config("glm", "[{}]"),
        ValueError,
        NOT_AN_OBJECT.format("an array"),
    ),
    (
        "convert chatglm-6b config.json a JSON string",
        convert_with_config("chatglm-6b", '"glm"'),
        ValueError,
        NOT_AN_OBJECT.format("a string"),
    ),
    (
        "convert gpt2 config.json a number",
        convert_with_config("gpt2", "3"),
        ValueError,
        NOT_AN_OBJECT.format("a number"),
    ),
]

BAD_CASES: list[Row] = [
    *[row for variant in GLM_VARIANTS for row in glm_rows(variant)],
    *CHATGLM_ROWS,
    *GLM_CONFIG_ROWS,
    *TOKENIZER_ROWS,
    *BART_ROWS,
    *SPARSE_ROWS,
    *CONVERT_ROWS,
    *[row for variant in GLM_VARIANTS for row in glm_more_rows(variant)],
    *BART_MORE_ROWS,
    *SPARSE_MORE_ROWS,
    *CONFIG_OVERRIDE_ROWS,
    *CONVERT_JSON_ROWS,
]


@pytest.mark.parametrize("case,call,error,message", BAD_CASES, ids=[row[0] for row in BAD_CASES])
def test_bad_input_raises_a_clear_error(case, call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_the_table_covers_every_entry_point():
    """At least 40 rows, and each family's forward, generate and config, the tokenizer and the command appear."""
    ids = [row[0] for row in BAD_CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    entries = {case.split(" ")[0] for case in ids}
    for variant in GLM_VARIANTS:
        assert {f"glm[{variant}].forward", f"glm[{variant}].generate"} <= entries
    assert {
        "glm.config",
        "bart.forward",
        "bart.generate",
        "bart.config",
        "sparse.forward",
        "sparse.generate",
    } <= entries
    assert {"sparse.config", "tokenizer.__call__", "tokenizer.decode", "tokenizer.__init__", "convert"} <= entries


# ------------------------------------------------------------------------------------ "never a silently wrong output"
@pytest.mark.parametrize("variant", GLM_VARIANTS)
def test_glm_blank_and_sop_ids_inside_the_padding_are_padding(variant):
    """Tokens under a 0 of the mask are padding whatever their id: the real tokens' logits are those of the same row
    padded with <pad>, and a blank in the padding never decides the span position."""
    model = glm_model(variant)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    real = [5, MASK, 7, GMASK, 9, SOP]
    tricky = model(torch.tensor([[SOP, GMASK] + real]), attention_mask=mask).logits[:, 2:]
    plain = model(torch.tensor([[PAD, PAD] + real]), attention_mask=mask).logits[:, 2:]
    alone = model(torch.tensor([real])).logits
    assert_close(tricky, plain, atol=1e-5, msg="ids inside the padding changed the output")
    assert_close(tricky, alone, atol=1e-4, msg="left padding changed the output")


def test_bart_accepts_right_padding_for_generation():
    """BART's encoder reads padding through the mask whichever side it is on: right padding is not an error."""
    model = bart_model()
    left = model.generate(torch.tensor([[1, 0, 5, 2]]), attention_mask=torch.tensor([[0, 1, 1, 1]]), **GREEDY)
    right = model.generate(torch.tensor([[0, 5, 2, 1]]), attention_mask=torch.tensor([[1, 1, 1, 0]]), **GREEDY)
    alone = model.generate(torch.tensor([[0, 5, 2]]), **GREEDY)
    assert torch.equal(right, alone) and left.shape == alone.shape


def test_tiny_configs_used_here_are_valid():
    """The table's builders themselves are sound: the good calls they derive from run."""
    assert glm_model()(torch.tensor([GLM_PROMPT])).logits.shape == (1, 5, GLM_TINY["vocab_size"])
    assert bart_model()(input_ids=BART_IDS).logits.shape == (1, 4, BART_TINY["vocab_size"])
    assert sparse_model()(SPARSE_IDS).logits.shape == (1, 8, SPARSE_TINY["vocab_size"])
    assert json.dumps(convert_checkpoint.discover()[0].keys().__len__())  # the command's architectures load
