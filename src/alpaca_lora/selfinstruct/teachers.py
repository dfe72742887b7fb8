"""Teachers: a local model folder (through :func:`alpaca_lora.generate`) or an OpenAI-compatible endpoint.

A teacher answers a list of prompts, each given as a body and the header that ends it (the first new
task's number), and says for each answer whether it stopped at the token limit.
"""

from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from alpaca_lora.errors import ConfigError, ModelError, shown

logger = logging.getLogger(__name__)

APIS = ("completions", "chat")
"""How a prompt is sent: as text to continue, or as one user message to a chat model."""


@dataclass(frozen=True)
class Sampling:
    """How a teacher samples.

    Attributes:
        max_new_tokens: Most tokens per answer.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        api: "completions" (the prompt is continued as text; any model) or "chat" (one user message).

    """

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    api: str = "completions"


@dataclass(frozen=True)
class Answer:
    """A teacher's answer: its text, whether the token limit cut it, and its length in tokens when known."""

    text: str
    cut: bool
    tokens: int | None = None


class Teacher(Protocol):
    """What :func:`alpaca_lora.selfinstruct.pipeline.self_instruct` needs of a teacher."""

    description: str
    """The teacher, for the report and the log (a folder name or a URL and model; never a key)."""

    def answer(self, prompts: list[tuple[str, str]], seed: int) -> list[Answer]:
        """Answer ``(body, header)`` prompts, in order; ``seed`` seeds a local teacher's sampling."""


class LocalTeacher:
    """A model folder (merged, adapter or any Llama folder) answered in batches by :func:`alpaca_lora.generate`."""

    def __init__(self, folder: str | Path, sampling: Sampling, *, batch_size: int = 8, compute_dtype: str = "auto",
                 quantization: str | None = None) -> None:
        from alpaca_lora.model.load import load_tokenizer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"teacher={shown(str(folder), 200)} is neither a folder nor an http(s) URL; give a model "
                              "folder or the base URL of an OpenAI-compatible server (http://127.0.0.1:8080/v1)")
        self.sampling, self.batch_size = sampling, batch_size
        self.compute_dtype, self.quantization = compute_dtype, quantization
        self.tokenizer = load_tokenizer(self.folder)
        self.description = f"local folder {self.folder.name}"

    def answer(self, prompts: list[tuple[str, str]], seed: int) -> list[Answer]:
        """Sample one answer per prompt (batched), seeded by ``seed``."""
        import torch

        from alpaca_lora.data.prompts import PromptTemplate
        from alpaca_lora.inference.generate import generate

        torch.manual_seed(seed)
        s = self.sampling
        options = dict(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                       batch_size=self.batch_size, compute_dtype=self.compute_dtype, quantization=self.quantization)
        if s.api == "chat":
            texts = generate(self.folder, [[{"role": "user", "content": body + header}] for body, header in prompts],
                             **options)
        else:  # the prompt's header ends it, as a template's response header does
            header = prompts[0][1]
            template = PromptTemplate("self-instruct", "{instruction}{input}" + header, "{instruction}" + header,
                                      header, "self-instruct")
            texts = generate(self.folder, [body for body, _ in prompts], template=template, **options)
        out = []
        for text in texts:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            out.append(Answer(text, cut=n >= s.max_new_tokens - 1, tokens=n))  # re-tokenized: may differ by one
        return out


@dataclass
class EndpointTeacher:
    """An OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, OpenAI) through the ``openai`` client.

    The API key is read from the environment variable ``api_key_env`` and never logged or written; a
    local server without keys needs none. Transient failures (connection, timeout, HTTP 429 and 5xx) are
    retried with exponential backoff; a refused key, an unknown model or a refused request is an error at once.
    """

    base_url: str
    sampling: Sampling
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 600.0
    backoff: float = 1.0
    description: str = field(init=False, default="")
    client: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            import openai
        except ImportError:
            raise ConfigError("an endpoint teacher needs the openai client: pip install 'alpaca_lora[self-instruct]'"
                              ) from None
        key = os.environ.get(self.api_key_env) or "no-key"  # a local server ignores it; the client needs a value
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout)
        if self.model is None:
            self.model = self._only_model()
        self.description = f"{self.base_url} model {self.model}"

    def answer(self, prompts: list[tuple[str, str]], seed: int) -> list[Answer]:
        """Send every prompt, at most ``concurrency`` at once; answers come back in prompt order."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._with_retries(p[0] + p[1]), prompts))

    def _with_retries(self, prompt: str) -> Answer:
        import openai

        transient = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        for attempt in range(self.max_retries + 1):
            try:
                return self._request(prompt)
            except transient as exc:  # APITimeoutError is an APIConnectionError
                if attempt == self.max_retries:
                    raise ModelError(f"the teacher at {self.base_url} failed {attempt + 1} times in a row; the last "
                                     f"error: {_error_text(exc)}. Check that the server is up, or raise max_retries"
                                     ) from None
                delay = min(self.backoff * 2**attempt, 60.0) * (1 + random.random() / 4)
                logger.warning("teacher request failed (%s); retry %d of %d in %.1f s", _error_text(exc),
                               attempt + 1, self.max_retries, delay)
                time.sleep(delay)
            except openai.APIStatusError as exc:
                raise self._refusal(exc) from None
        raise AssertionError("unreachable")

    def _request(self, prompt: str) -> Answer:
        s = self.sampling
        common = dict(model=self.model, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
        if s.api == "chat":
            r = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
            text = r.choices[0].message.content or ""
        else:
            r = self.client.completions.create(prompt=prompt, **common)
            text = r.choices[0].text or ""
        tokens = getattr(r.usage, "completion_tokens", None) if r.usage is not None else None
        return Answer(text, cut=r.choices[0].finish_reason == "length", tokens=tokens)

    def _refusal(self, exc: Any) -> ConfigError:
        code = exc.status_code
        if code in (401, 403):
            return ConfigError(f"{self.base_url} refused the API key (HTTP {code}): set the environment variable "
                               f"{self.api_key_env} to a valid key (or name another variable with api_key_env)")
        if code == 404:
            return ConfigError(f"{self.base_url} has no model {self.model!r} or no {self.sampling.api} API "
                               f"(HTTP 404); models it serves: {self._models()}. Pass one as model=, or "
                               f"api={'chat' if self.sampling.api == 'completions' else 'completions'!r}")
        return ConfigError(f"{self.base_url} refused the request (HTTP {code}): {_error_text(exc)}; check model=, "
                           "max_new_tokens (the prompt and answer must fit the server's context) and api=")

    def _models(self) -> str:
        try:
            return shown([m.id for m in self.client.models.list()], 300)
        except Exception as exc:  # noqa: BLE001 - only for the message
            return f"(the list failed: {_error_text(exc)})"

    def _only_model(self) -> str:
        import openai

        try:
            ids = [m.id for m in self.client.models.list()]
        except openai.APIStatusError as exc:
            raise self._refusal(exc) from None
        except openai.APIConnectionError as exc:
            raise ModelError(f"cannot reach the teacher at {self.base_url}: {_error_text(exc)}. Start the server, "
                             "or check the URL (it ends in /v1 for most servers)") from None
        if len(ids) != 1:
            raise ConfigError(f"{self.base_url} serves {len(ids)} models ({shown(ids, 300)}); name one with model=")
        return ids[0]


def _error_text(exc: BaseException) -> str:
    """An error's message, cut: a server may answer with a whole page."""
    return shown(f"{type(exc).__name__}: {exc}", 300)
