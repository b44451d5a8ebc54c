"""Prompts for multiple-choice questions, rendered with the tokenizer's own chat template.

The user turn holds the question and lettered options (and the context, e.g. a PubMedQA abstract); the
system prompt carries the instruction (the paper's style: think step by step, end with "The answer is X").
An assistant prefix (adversarial evaluation) is text appended after the rendered generation prompt, so
the model continues it as if it had written it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from medkr_jax.data.answer import LETTERS

DEFAULT_SYSTEM_PROMPT = ("You are a medical expert. Think step by step, then end your reply with "
                         "'The answer is X.' where X is the letter of the correct option.")
# Fields: {context} (empty or "Context: ...\n\n"), {question}, {options} ("A. ...\nB. ...").
DEFAULT_TEMPLATE = "{context}Question: {question}\n\nOptions:\n{options}"


class PromptError(ValueError):
    """A prompt template or tokenizer cannot render a question."""


def format_options(options: Sequence[str]) -> str:
    """'A. first\\nB. second ...'."""
    if len(options) > len(LETTERS):
        raise PromptError(f"{len(options)} options; at most {len(LETTERS)} can be lettered")
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def format_question(record: Any, template: str = DEFAULT_TEMPLATE) -> str:
    """The user-turn text of one MCQ record (fields: question, options, context)."""
    context = getattr(record, "context", None)
    try:
        return template.format(
            context=f"Context: {context.strip()}\n\n" if context else "",
            question=record.question.strip(),
            options=format_options(record.options),
        )
    except (KeyError, IndexError) as err:
        raise PromptError(f"config.eval.prompt_template {template!r}: unknown field {err}; "
                          "use {context}, {question}, {options}") from None


def render_chat(tokenizer: Any, user_text: str, *, system_prompt: str = "", assistant_prefix: str = "",
                chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """Chat-template text ending in the assistant turn (add_generation_prompt=True) plus ``assistant_prefix``.

    Tokenizers without a chat template (base models) get a plain "system\\n\\nuser\\n\\nAnswer: " layout.
    Templates that reject a system role (e.g. Gemma) get the system prompt folded into the user turn.
    """
    kwargs = dict(chat_template_kwargs or {})
    if getattr(tokenizer, "chat_template", None) is None:
        parts = [p for p in (system_prompt, user_text) if p]
        return "\n\n".join(parts) + "\n\nAnswer: " + assistant_prefix
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user_text}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as err:  # jinja raise_exception() of templates without a system role
        if not system_prompt or "system" not in str(err).lower():
            raise PromptError(f"the tokenizer's chat template failed: {err}") from None
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{user_text}"}]
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True, **kwargs)
    return text + assistant_prefix


def build_prompt(tokenizer: Any, record: Any, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 template: str = DEFAULT_TEMPLATE, assistant_prefix: str = "",
                 chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """Full prompt text for one record: chat template with the generation prompt, then the prefix."""
    return render_chat(tokenizer, format_question(record, template), system_prompt=system_prompt,
                       assistant_prefix=assistant_prefix, chat_template_kwargs=chat_template_kwargs)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt.

    Chat templates already write the BOS token when the model wants one, so special tokens are only
    added for tokenizers without a template.
    """
    add_special = getattr(tokenizer, "chat_template", None) is None
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def stop_token_ids(tokenizer: Any, eos_token_ids: Sequence[int] = (),
                   stop_strings: Sequence[str] = ()) -> tuple[int, ...]:
    """Stop ids: the model config's EOS ids, the tokenizer's EOS, and extra single-token strings
    (e.g. "<|im_end|>", "<|eot_id|>")."""
    ids = [int(i) for i in eos_token_ids if i is not None]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    for s in stop_strings:
        tok = tokenizer.convert_tokens_to_ids(s)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tok is None or (unk is not None and tok == unk and s != getattr(tokenizer, "unk_token", None)):
            raise PromptError(f"config.eval.stop_strings: {s!r} is not a single token of this tokenizer")
        ids.append(int(tok))
    if not ids:
        raise PromptError("no stop token: the tokenizer has no eos_token and config.eval.stop_strings is empty")
    return tuple(dict.fromkeys(ids))
