"""`dataset=tldr`: Reddit TL;DR summaries and the summarize_from_feedback comparisons."""

from __future__ import annotations

from collections.abc import Mapping

from prefkit.datasets.base import register
from prefkit.datasets.reader import SOURCE_KEYS, Malformed, SourceAdapter, as_text, pair_row, plain
from prefkit.errors import UserError

TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


class TLDR(SourceAdapter):
    """Reddit TL;DR. Preference and prompt rows: openai/summarize_from_feedback "comparisons"
    ({"info": {"post", "title", "subreddit", "article", ...}, "summaries": [{"text"}, {"text"}],
    "choice", "extra": {"confidence"}}) with the prompt `template` and completions
    " " + summary.strip(). SFT rows: `sft_source`, CarperAI/openai_summarize_tldr ({"prompt",
    "label"}) or a {"subreddit", "title", "post", "summary"} dataset; with sft_source null, the
    comparisons' chosen summaries."""

    keys = frozenset({"sft_source", "template", "article_template", "site", "min_confidence", "null_confidence"})

    def __init__(self, ds, kind, tokenizer=None, run=None):
        super().__init__(ds, kind, tokenizer)
        self.template = str(ds.get("template") or TLDR_TEMPLATE)
        self.article_template = ds.get("article_template")
        _check_template(self.template, ("subreddit", "title", "post"), "template")
        if self.article_template is not None:
            _check_template(str(self.article_template), ("title", "article", "site"), "article_template")
        self.site = str(ds.get("site", "reddit"))
        if self.site not in ("reddit", "news", "all"):
            raise UserError(f"dataset tldr: site={self.site}; valid: reddit, news, all")
        if self.site != "reddit" and self.article_template is None:
            raise UserError(f"dataset tldr: site={self.site} needs an article_template for the news articles")
        self.null_confidence = str(ds.get("null_confidence", "keep"))
        if self.null_confidence not in ("keep", "drop"):
            raise UserError(f"dataset tldr: null_confidence={self.null_confidence}; valid: keep, drop")
        self.min_confidence = ds.get("min_confidence")
        sft_source = plain(ds.get("sft_source"))
        self.sft_source = sft_source if kind == "sft" and sft_source else None
        if self.sft_source is not None:
            unknown = sorted(set(self.sft_source) - set(SOURCE_KEYS))
            if unknown:
                raise UserError(f"dataset tldr: unknown key(s) {', '.join(unknown)} in sft_source; "
                                f"valid: {', '.join(SOURCE_KEYS)}")
        self.sft_schema = None

    def source(self):
        return self.sft_source if self.sft_source is not None else self.ds

    def missing_columns(self, found):
        if self.sft_source is None:
            return [c for c in ("info", "summaries", "choice") if c not in found]
        for schema in (("prompt", "label"), ("subreddit", "title", "post", "summary")):
            if all(c in found for c in schema):
                self.sft_schema = schema
                return []
        return ["prompt and label (CarperAI/openai_summarize_tldr), or subreddit, title, post and summary"]

    def carve_key(self, raw, index):
        if self.sft_source is not None:
            return str(raw.get("prompt") or raw.get("post"))
        info = raw.get("info") or {}
        return str(info.get("post") or info.get("article") or index)

    def convert(self, raw, index):
        if self.sft_source is not None:
            return self._sft(raw)
        info = raw.get("info")
        if not isinstance(info, Mapping):
            raise Malformed("'info' is missing")
        confidence = (raw.get("extra") or {}).get("confidence")
        if confidence is None:
            if self.null_confidence == "drop":
                return None
        elif self.min_confidence is not None and confidence < self.min_confidence:
            return None
        news = info.get("post") is None and info.get("article") is not None
        if (self.site == "reddit" and news) or (self.site == "news" and not news):
            return None
        fields = {k: info.get(k) or "" for k in ("subreddit", "title", "site")}
        if news:
            prompt = str(self.article_template).format(article=as_text(info.get("article"), "info.article"), **fields)
        else:
            prompt = self.template.format(post=as_text(info.get("post"), "info.post"), **fields)
        summaries, choice = raw.get("summaries"), raw.get("choice")
        if not isinstance(summaries, list) or len(summaries) != 2:
            raise Malformed("'summaries' must hold exactly two summaries")
        if choice not in (0, 1):
            raise Malformed(f"'choice' must be 0 or 1, not {choice!r}")
        texts = [as_text((s or {}).get("text"), f"summary {j}") for j, s in enumerate(summaries)]
        if any(not t.strip() for t in texts):
            raise Malformed("a summary is empty")
        chosen, rejected = " " + texts[choice].strip(), " " + texts[1 - choice].strip()
        return pair_row(self.kind, prompt, chosen, rejected, confidence=confidence)

    def _sft(self, raw):
        if self.sft_schema == ("prompt", "label"):
            prompt, summary = as_text(raw.get("prompt"), "prompt").rstrip(), as_text(raw.get("label"), "label")
        else:
            fields = {k: as_text(raw.get(k), k) for k in ("subreddit", "title", "post")}
            prompt, summary = self.template.format(**fields), as_text(raw.get("summary"), "summary")
        if not summary.strip():
            raise Malformed("the summary is empty")
        return {"prompt": prompt, "completion": " " + summary.strip()}


def _check_template(template: str, fields: tuple[str, ...], key: str) -> None:
    try:
        template.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"dataset tldr: {key} may use only {', '.join('{' + f + '}' for f in fields)} "
                        f"({type(err).__name__}: {err})") from None


register("tldr", TLDR)
