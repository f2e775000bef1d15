"""LM Evaluation Harness adapter: our model as lm-eval's `gpt-neo-jax`.

    python -m gpt_neo.cli.lm_eval run --model gpt-neo-jax \\
        --model_args config=configs/demo.json,checkpoint=runs/demo --tasks lambada_openai

forwards every argument to lm-eval's own command line after importing this module, which
registers the model (lm-eval 0.4.13 discovers models only by import; later versions with plugin
discovery find it through the `lm_eval.models` entry point that pyproject.toml declares, so
`lm_eval --model gpt-neo-jax` works there directly). From Python:

    from gpt_neo.interop.lm_eval import GPTNeoJAX
    lm_eval.simple_evaluate(model=GPTNeoJAX(config="cfg.json"), tasks=[...])

`config` is our JSON model config, `checkpoint` its model_path (default: the config's); the
tokenizer is the one the config's dataset names. Scoring goes through `gpt_neo.inference.tasks.Scorer`
and generation through `gpt_neo.generate`, so harness numbers equal ours.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from gpt_neo.config import load_config
from gpt_neo.data.dataset_config import model_tokenizer
from gpt_neo.errors import ConfigError
from gpt_neo.inference.sample import generate
from gpt_neo.inference.tasks import DEFAULT_BATCH, Scorer
from gpt_neo.training.checkpoint.checkpointer import load_params


@register_model("gpt-neo-jax")
class GPTNeoJAX(LM):
    def __init__(
        self,
        config: str,
        checkpoint: str | None = None,
        batch_size: int | str = DEFAULT_BATCH,
        max_gen_toks: int = 256,
        **_ignored,
    ):
        super().__init__()
        overrides = {"model_path": checkpoint} if checkpoint else None
        self.cfg = load_config(config, overrides=overrides)
        self.encoder, eos_id = model_tokenizer(self.cfg)
        if eos_id is None:
            raise ConfigError(
                "the harness scores after an end-of-text token, and the tokenizer has none: set "
                "eos_id in the dataset config"
            )
        self.eos_id: int = eos_id
        self.params, self.step = load_params(self.cfg)
        batch = DEFAULT_BATCH if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.cfg, self.params, batch_size=batch)
        self.max_gen_toks = int(max_gen_toks)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation); trailing spaces of the context move to the
        continuation (as lm-eval's HF model does), an empty context becomes [eos]."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        context_ids = self.encoder.encode(stripped) if stripped else [self.eos_id]
        return context_ids, self.encoder.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self._pair(*request.args) for request in requests]
        return self.scorer.loglikelihood(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return [
            self.scorer.loglikelihood_rolling(self.encoder.encode(request.args[0]), self.eos_id)
            for request in requests
        ]

    def generate_until(self, requests, disable_tqdm: bool = False):
        results = []
        for request in requests:
            context, settings = request.args
            settings = dict(settings or {})
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = settings.get("temperature", 0.0) if settings.get("do_sample") else 0.0
            prompt = self.encoder.encode(context) or [self.eos_id]
            new = generate(
                self.cfg,
                self.params,
                [prompt],
                max_new_tokens=int(settings.get("max_gen_toks", self.max_gen_toks)),
                temperature=temperature,
                eos_id=self.eos_id,
            )[0]
            if new and new[-1] == self.eos_id:
                new = new[:-1]
            text = self.encoder.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            results.append(text)
        return results
