"""``LLM``: the offline API. Submits every prompt to one ``Engine`` and steps it to the end."""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from fastinfer.engine.config import EngineConfig
from fastinfer.engine.engine import Engine, Prompt
from fastinfer.engine.outputs import RequestOutput
from fastinfer.sampling.params import SamplingParams

Message = dict[str, str]


class LLM:
    """``LLM(model, **engine_options)``; options are the fields of ``EngineConfig``."""

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = Engine(self.config)

    def get_tokenizer(self):
        """The model's tokenizer (``encode``, ``decode``, ``apply_chat_template``)."""
        return self.engine.tokenizer

    def stats(self) -> dict[str, int]:
        """Scheduler and KV-cache counters (see ``Engine.stats``)."""
        return self.engine.stats()

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt (strings or token-id lists) and returns the final
        ``RequestOutput``s in input order. All or nothing: when one prompt is rejected, the
        ones already queued are aborted and the error is raised."""
        prompts = _as_prompt_list(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))
        ids = self._submit_all(prompts, params)
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            finals = self.engine.drain(lambda _: bar.update(1))
        return [finals[i] for i in ids]

    def _submit_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        submitted: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                submitted.append(self.engine.add_request(p, sp))
        except Exception:
            for rid in submitted:  # all or nothing: leave no orphan requests behind
                self.engine.abort(rid)
            self.engine.drain()
            raise
        return submitted

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (a list of
        ``{"role", "content"}`` dicts) or to several, then generates."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts: list[Prompt] = [
            tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True) for c in convs
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Seq) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def _params_per_prompt(sp: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n:
        raise ValueError(f"got {len(sp)} sampling params for {n} prompts")
    return sp
