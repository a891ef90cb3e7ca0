"""``LLM``: the offline API. Submits every prompt to one ``Engine`` and steps it to the end."""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from fastinfer.engine.config import EngineConfig
from fastinfer.engine.engine import Engine
from fastinfer.engine.outputs import RequestOutput
from fastinfer.errors import InvalidArgumentError, InvalidRequestError
from fastinfer.sampling.params import SamplingParams
from fastinfer.validation import Message, Prompt, as_conversations, as_prompts, check_bool, check_int, fail


class LLM:
    """``LLM(model, **engine_options)``; options are the fields of ``EngineConfig`` (an unknown
    one raises ``TypeError`` naming it)."""

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any) -> None:
        self.config = EngineConfig.from_options(model, **kwargs)
        self.engine = Engine(self.config)

    def get_tokenizer(self):
        """The model's tokenizer (``encode``, ``decode``, ``apply_chat_template``)."""
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stops the engine's tensor-parallel workers (if any); also done at exit."""
        self.engine.shutdown()

    def stats(self) -> dict[str, int]:
        """Scheduler and KV-cache counters (see ``Engine.stats``)."""
        return self.engine.stats()

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, priority: Seq[int] | None = None) -> list[RequestOutput]:
        """Generates for every prompt and returns the final ``RequestOutput``s in input order.

        ``prompts``: a string, a sequence of int token ids, or a list of those; anything else
        raises ``RequestTypeError`` naming the type. ``sampling_params``: one
        ``SamplingParams`` or a list with one per prompt. ``priority``: None (all 0) or a list
        of ints, one per prompt; a lower value is served first (see ``Engine.add_request``).
        All or nothing: when one prompt is rejected, or ``generate`` ends by an exception
        (Ctrl-C included), every request it submitted is aborted and its KV blocks freed
        before the exception propagates.
        """
        prompts = as_prompts(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))
        priorities = _priority_per_prompt(priority, len(prompts))
        show = check_bool("use_tqdm", use_tqdm)
        ids: list[str] = []
        try:
            for i, (p, sp, pr) in enumerate(zip(prompts, params, priorities)):
                ids.append(self._submit(p, sp, pr, i if len(prompts) > 1 else None))
            with tqdm(total=len(ids), desc="generate", unit="req", disable=not show) as bar:
                finals = self.engine.drain(ids, lambda _: bar.update(1))
        except BaseException:
            self._abort_all(ids)
            raise
        return [finals[i] for i in ids]

    def _submit(self, prompt: Prompt, params: SamplingParams, priority: int, index: int | None) -> str:
        """``add_request``; a refusal of the ``index``-th of several prompts says which one."""
        try:
            return self.engine.add_request(prompt, params, priority=priority)
        except InvalidRequestError as exc:
            if index is None:
                raise
            raise type(exc)(f"prompts[{index}]: {exc}", exc.argument) from exc

    def _abort_all(self, ids: list[str]) -> None:
        """Aborts ``ids`` and steps until their final outputs are out (no model runs: aborted
        requests only emit), so no request of this call is left holding KV blocks."""
        for rid in ids:
            self.engine.abort(rid)
        self.engine.drain(ids)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (a list of
        ``{"role", "content"}`` dicts, roles system/user/assistant, content a string) or to a
        list of conversations, then generates. Bad messages raise before anything runs."""
        convs = as_conversations(messages)
        add = check_bool("add_generation_prompt", add_generation_prompt)
        tok = self.get_tokenizer()
        prompts: list[Prompt] = [tok.apply_chat_template(c, add_generation_prompt=add, tokenize=True) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _params_per_prompt(sp: Any, n: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt from None, one object, or a list of them."""
    expected = "a SamplingParams or a list of them (one per prompt)"
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    if not isinstance(sp, (list, tuple)):
        hint = "; build one with SamplingParams(**...)" if isinstance(sp, dict) else ""
        fail("sampling_params", expected + hint, sp, InvalidRequestError, wrong_type=True)
    for i, p in enumerate(sp):
        if not isinstance(p, SamplingParams):
            fail(f"sampling_params[{i}]", "a SamplingParams", p, InvalidRequestError, wrong_type=True)
    if len(sp) != n:
        raise InvalidArgumentError(f"sampling_params has {len(sp)} entries for {n} prompts: expected one "
                                   "SamplingParams, or one per prompt", "sampling_params")
    return list(sp)


def _priority_per_prompt(priority: Any, n: int) -> list[int]:
    """One priority per prompt from None (all 0) or a list of ints (vLLM's ``priority``); the
    engine checks their range."""
    if priority is None:
        return [0] * n
    if not isinstance(priority, (list, tuple)):
        fail("priority", "None or a list of ints (one per prompt)", priority, InvalidRequestError, wrong_type=True)
    if len(priority) != n:
        raise InvalidRequestError(f"priority has {len(priority)} entries for {n} prompts: expected one int "
                                  "per prompt (or None for all 0)", "priority")
    return [check_int(f"priority[{i}]", p, error=InvalidRequestError) for i, p in enumerate(priority)]
