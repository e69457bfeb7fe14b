"""BART-gen's text2text-generation pipeline: `pipeline("text2text-generation", model=DIR, trust_remote_code=True)`
on transformers 4.57 and 5.x alike.

transformers 5.x removed its text2text-generation, summarization and translation tasks (4.57 still has them).
BART-gen's config names `BartGenText2TextPipeline` under `custom_pipelines` (as
`modeling_bart_gen.BartGenText2TextPipeline`: the modeling file imports it, so transformers' remote-code loader
copies this file with it), and `pipeline()` reads that table before its own task table on both versions.

A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

import torch
from transformers import Pipeline


class BartGenText2TextPipeline(Pipeline):
    """Text-to-text generation with BART-gen, for `pipeline("text2text-generation", model=DIR, trust_remote_code=True)`.

    transformers 5.x removed its text2text-generation, summarization and translation tasks (4.57 still has them).
    BART-gen's config names this class under `custom_pipelines`, which `pipeline()` reads before its own task table
    on both versions, so the same call works on 4.57 and 5.x and gives the same output on both. Results have the
    format of 4.57's `Text2TextGenerationPipeline`: one `{"generated_text": ...}` per returned sequence
    (`{"generated_token_ids": ...}` with `return_tensors=True`); a list of strings gives one result per string.
    Generation settings come from the model's `generation_config.json`; keyword arguments go to `generate()`.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(
        self,
        return_tensors: bool | None = None,
        clean_up_tokenization_spaces: bool | None = None,
        truncation: bool | str | None = None,
        **generate_kwargs,
    ) -> tuple[dict, dict, dict]:
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        postprocess_params = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = return_tensors
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        return preprocess_params, generate_kwargs, postprocess_params

    def __call__(self, inputs: str | list[str], **kwargs) -> list[dict] | list[list[dict]]:
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(len(records) == 1 for records in result):
            return [records[0] for records in result]  # one sequence per input: a flat list, as 4.57 returns
        return result

    def preprocess(self, text: str, truncation: bool | str = False) -> dict[str, torch.Tensor]:
        if not isinstance(text, str):
            raise ValueError(
                f"the text2text-generation pipeline takes a str or a list of str, got {type(text).__name__}"
            )
        encoded = self.tokenizer(text, truncation=truncation, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs) -> dict[str, torch.Tensor]:
        batch_size = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)  # (B * num_return_sequences, T)
        return {"output_ids": output_ids.view(batch_size, -1, output_ids.shape[-1])}  # (B, n, T)

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], return_tensors: bool = False, clean_up_tokenization_spaces=False
    ) -> list[dict]:
        if return_tensors:
            return [{"generated_token_ids": ids} for ids in model_outputs["output_ids"][0]]
        return [
            {
                "generated_text": self.tokenizer.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up_tokenization_spaces
                )
            }
            for ids in model_outputs["output_ids"][0]
        ]
