"""Optional Hugging Face ``transformers`` adapter (``pip install megabyte-kernels[hf]``).

As in the original implementation's README::

    from megabyte.hf import MegabyteForCausalLM, MegabyteTokenizer
    tokenizer = MegabyteTokenizer()
    model = MegabyteForCausalLM.from_megabyte(Megabyte.from_pretrained("runs/demo"))  # or (MegabyteHFConfig(...))
    out = model.generate(**tokenizer("Today is", return_tensors="pt"), max_new_tokens=20, do_sample=False)
    print(tokenizer.decode(out[0]))

Conventions. MEGABYTE's own logits at position t predict byte t from bytes < t; Hugging Face's
causal-LM logits at position t predict the *next* token t + 1. The wrapper's ``forward`` runs the
model on ``input_ids`` plus one dummy byte and returns ``lm_logits[:, 1:]``, so ``logits[:, t]``
is the distribution of byte t + 1 given bytes <= t and everything in ``GenerationMixin``
(greedy, sampling, beam search, logits processors) works unchanged. ``generate`` adds one
default processor, :class:`ByteVocabLogitsProcessor` (byte values and EOS only, applied before
temperature / top-k / top-p; ``generate(..., vocab="all")`` turns it off). The ``transformers`` loop
recomputes the whole model at each step (no Hugging Face cache); :meth:`generate_cached`
(= :func:`megabyte.generation.generate`) is the fast path.

MEGABYTE has no attention mask: a pad byte would be read as input. With an ``attention_mask``
that masks positions (a left-padded batch), each row's masked positions are dropped and the row
is run on its own, so batched prompts of different lengths give each row's unpadded result.

Tokenizer: one id per UTF-8 byte (id = byte value, 0-255), ``<unk>`` = 256, the config's
``pad_id`` (257) as ``<pad>`` and ``eos_id`` (258) as ``</s>``; nothing is added to the input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from transformers import AddedToken, GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizer
    from transformers.generation.logits_process import LogitsProcessor
    from transformers.modeling_outputs import CausalLMOutput
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("megabyte.hf needs the `transformers` package: pip install 'megabyte-kernels[hf]'") from e

from .config import MegabyteConfig
from .generation import allowed_ids, check_vocab, restrict_logits
from .model import Megabyte

__all__ = ["MegabyteHFConfig", "MegabyteForCausalLM", "MegabyteTokenizer", "ByteVocabLogitsProcessor"]


class MegabyteHFConfig(PretrainedConfig):
    """A ``PretrainedConfig`` holding a :class:`MegabyteConfig` as the dict ``megabyte``."""

    model_type = "megabyte"

    def __init__(self, megabyte: dict | None = None, **kwargs):
        cfg = MegabyteConfig.from_dict(dict(megabyte or {}))
        self.megabyte = cfg.to_dict()
        self.vocab_size = cfg.V
        kwargs.setdefault("pad_token_id", cfg.pad_id)
        kwargs.setdefault("eos_token_id", cfg.eos_id)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)

    def to_megabyte_config(self) -> MegabyteConfig:
        return MegabyteConfig.from_dict(dict(self.megabyte))


class ByteVocabLogitsProcessor(LogitsProcessor):
    """Restrict generation to the 256 byte values plus the EOS id(s): other scores become ``-inf``.

    ``scores`` (B, V) -> (B, V), ``scores[:, i] = -inf`` unless ``i < 256`` or ``i`` is an EOS id
    (:func:`megabyte.generation.restrict_logits`, the mask of ``Megabyte.generate(vocab="bytes")``).
    """

    def __init__(self, vocab_size: int, eos_token_id=None):
        self.allowed = allowed_ids(vocab_size, "bytes", eos_token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return restrict_logits(scores, self.allowed)


class MegabyteForCausalLM(PreTrainedModel, GenerationMixin):
    """``PreTrainedModel`` + ``GenerationMixin`` around :class:`megabyte.Megabyte` (``self.megabyte``)."""

    config_class = MegabyteHFConfig
    base_model_prefix = "megabyte"
    main_input_name = "input_ids"

    def __init__(self, config: MegabyteHFConfig, megabyte: Megabyte | None = None):
        super().__init__(config)
        self.megabyte = megabyte if megabyte is not None else Megabyte(config.to_megabyte_config())
        self.post_init()
        self.generation_config.use_cache = False

    @classmethod
    def from_megabyte(cls, model: Megabyte) -> "MegabyteForCausalLM":
        """Wrap an existing model (weights shared, not copied)."""
        return cls(MegabyteHFConfig(model.config.to_dict()), megabyte=model)

    def _init_weights(self, module):  # Megabyte initialises itself (DESIGN.md §2)
        pass

    def get_input_embeddings(self):
        return self.megabyte.g_embedder

    def _next_byte_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V): position t predicts byte t + 1."""
        dummy = torch.full((ids.shape[0], 1), self.megabyte.config.pad_id, dtype=ids.dtype, device=ids.device)
        return self.megabyte(torch.cat([ids, dummy], dim=1)).lm_logits[:, 1:]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutput:
        """``logits[:, t]`` predicts byte t + 1; ``loss`` is Hugging Face's shifted cross entropy
        of ``labels`` (``-100`` ignored). Masked positions of ``attention_mask`` are dropped per row
        (their logits are zero)."""
        if attention_mask is None or bool(attention_mask.all()):
            logits = self._next_byte_logits(input_ids)
        else:
            logits = torch.zeros(*input_ids.shape, self.megabyte.config.V, device=input_ids.device,
                                 dtype=self.megabyte.g_embedder.weight.dtype)
            for b in range(input_ids.shape[0]):
                keep = attention_mask[b].bool()
                if bool(keep.any()):
                    logits[b, keep] = self._next_byte_logits(input_ids[b, keep][None])[0].to(logits.dtype)
        loss = None
        if labels is not None:
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generate(self, *args, vocab: str = "bytes", **kwargs):
        """``GenerationMixin.generate`` that samples only byte values and EOS by default.

        ``vocab="bytes"`` (default): a :class:`ByteVocabLogitsProcessor` runs first, before any
        temperature / top-k / top-p warper, so new tokens are ids < 256, EOS, or ``pad_token_id``
        after EOS. ``vocab="all"``: every id can be sampled, as plain ``transformers``.
        ``forward``'s logits are never restricted.
        """
        check_vocab(vocab)
        previous, self._generate_vocab = getattr(self, "_generate_vocab", "bytes"), vocab
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._generate_vocab = previous

    def _get_logits_processor(self, generation_config, *args, **kwargs):
        """The default processors, with :class:`ByteVocabLogitsProcessor` first unless ``vocab="all"``."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if getattr(self, "_generate_vocab", "bytes") == "bytes":
            eos = getattr(generation_config, "_eos_token_tensor", None)
            eos = generation_config.eos_token_id if eos is None else eos
            processors.insert(0, ByteVocabLogitsProcessor(self.megabyte.config.V, eos))
        return processors

    def generate_cached(self, prompt_ids, max_new_bytes: int, **kwargs) -> torch.Tensor:
        """The fast path: :func:`megabyte.generation.generate` (ragged prompts, new ids only)."""
        return self.megabyte.generate(prompt_ids, max_new_bytes, **kwargs)


class MegabyteTokenizer(PreTrainedTokenizer):
    """Byte tokenizer: UTF-8 bytes are ids 0-255; ``<unk>`` 256, ``<pad>`` 257, ``</s>`` 258."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", unk_id: int = 256,
                 pad_id: int = 257, eos_id: int = 258, padding_side: str = "left", **kwargs):
        unk_token, pad_token, eos_token = (AddedToken(t, lstrip=False, rstrip=False, special=True) if isinstance(t, str)
                                           else t for t in (unk_token, pad_token, eos_token))
        self._added_tokens_decoder = {unk_id: unk_token, pad_id: pad_token, eos_id: eos_token}
        self._ids = dict(unk_id=unk_id, pad_id=pad_id, eos_id=eos_id)
        super().__init__(unk_token=unk_token, pad_token=pad_token, eos_token=eos_token, padding_side=padding_side,
                         unk_id=unk_id, pad_id=pad_id, eos_id=eos_id, **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict:
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) == 1 and ord(token) < 256:
            return ord(token)
        return self._ids["unk_id"]

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < 256:
            return chr(index)
        return str(self._added_tokens_decoder.get(index, self.unk_token))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        for t in tokens:
            if len(t) == 1 and ord(t) < 256:
                out.append(ord(t))
            else:
                out += str(t).encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        return ()  # the vocabulary is fixed: nothing to write
