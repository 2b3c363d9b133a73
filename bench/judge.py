"""Judges of contextual hallucination: is an output supported by the document it was made from?

Two kinds, behind one small interface (`Judge.judge(list[JudgeInput]) -> list[Verdict]`):

- `overlap` (offline, no model): every fact of the output must be held by the source (document
  and question): numbers in digits or words ("seven" = 7), ordinals, dates, negations (a denied
  unit must be denied there too), names and every other content word, matched by lemma and
  stem. The support score is the share held; ROUGE-L against the reference comes through
  `rouge-score`.
- `llm`: the binary judge of Lookback Lens (Chuang et al. 2024), as the DIFF paper's Table 4 uses
  it: the judge sees the document, the ground truth and the proposal and must end with
  "Conclusion: True/False". It runs over any OpenAI-compatible chat endpoint (`EndpointJudge`,
  with retries, backoff and a local response cache, so a rerun never pays twice) or locally
  through a diffbench backend with any model (`BackendJudge`). A reply without a readable
  conclusion counts as not hallucination-free and is marked `parsed=False`.

Nothing here imports torch; `BackendJudge` loads a model through `diffbench.models` only when
asked for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from diffbench.errors import DiffbenchError
from diffbench.jsonl import read_objects

log = logging.getLogger("diffbench")

Kind = Literal["summary", "answer"]


@dataclass(frozen=True)
class JudgeInput:
    """One output to judge, with the document it was made from."""

    id: str
    document: str
    output: str
    question: str = ""
    reference: str = ""

    @property
    def kind(self) -> Kind:
        """An answer when there is a question, else a summary."""
        return "answer" if self.question.strip() else "summary"


@dataclass(frozen=True)
class Verdict:
    """A judge's call on one output, with the text it came from."""

    supported: bool  # judged accurate and free of hallucination
    support_score: float  # overlap: share of supported units; llm: 1.0 or 0.0
    raw: str  # the judge's own text (llm), or the unsupported units (overlap)
    parsed: bool = True  # False: the llm judge's reply had no readable conclusion
    rouge_l: float | None = None  # ROUGE-L F1 against the reference (overlap judge)
    spans: tuple[str, ...] = ()  # the problematic spans the judge named

    def as_row(self) -> dict[str, Any]:
        """The verdict as output columns."""
        return {
            "supported": self.supported,
            "support_score": self.support_score,
            "parsed": self.parsed,
            "rouge_l": self.rouge_l,
            "spans": list(self.spans),
            "verdict": self.raw,
        }


class Judge(Protocol):
    """Anything that judges outputs; `name` says which judge and settings made a verdict."""

    @property
    def name(self) -> str: ...

    def judge(self, items: Sequence[JudgeInput]) -> list[Verdict]: ...


# ---- overlap: support of the output's facts by the source --------------------------------------

# Function words: an output may use them freely. Negation cues are not among them.
STOPWORDS = frozenset(
    """a about above across after again against all along already also although am among an and
    any are around as at be because been before behind being below beside between both but by can
    could did do does doing down during each either even every few for from further had has have
    having he her here hers herself him himself his how however i if in into is it its itself just
    may me might more most much must my myself near now of off on once only onto or other our ours
    ourselves out over own per same shall she should since so some still such than that the their
    theirs them themselves then there these they this those though through to too toward towards
    under unless until up upon very via was we were what whereas whether when where which while
    who whom whose why will with within would yet you your yours yourself yourselves
    document summary answer article question according said says""".split()  # noqa: SIM905
)
# A negation cue denies the next content unit of its clause, and that unit must be denied in the
# source too ("not founded" needs a "not founded" there). Only the head is scoped: a scope to the
# clause's end would fail a reordered paraphrase ("in winter the ferry does not run").
NEGATIONS = frozenset(
    "not no never without none nobody nothing nowhere neither nor cannot".split()  # noqa: SIM905
)
_CLAUSE_WORDS = frozenset(
    "and but however although though yet whereas while which who whom whose".split()  # noqa: SIM905
)
_MONTH_NAMES = ("january", "february", "march", "april", "may", "june", "july", "august",
                "september", "october", "november", "december")  # fmt: skip
_MONTHS = {name[:3]: i for i, name in enumerate(_MONTH_NAMES, 1)}
_MONTH = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\b\.?"
)
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?(?!\d)"
_YEAR = r"\d{4}(?!\d)"
_UNIT = re.compile(
    rf"(?P<iso>\b\d{{4}}-[01]\d-[0-3]\d\b)"
    rf"|(?P<md>\b{_MONTH}\s+{_DAY}(?:,?\s+{_YEAR})?)"
    rf"|(?P<dm>\b{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+{_YEAR})?)"
    rf"|(?P<my>\b{_MONTH},?\s+(?:of\s+)?{_YEAR})"
    r"|(?P<ordinal>\b\d+(?:st|nd|rd|th)\b)"
    r"|(?P<number>\d+(?:[.,]\d+)*)"
    r"|(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*)"
    r"|(?P<stop>[.,;:!?()\[\]{}—–\n]|\s-\s)"
)
_SCALED = re.compile(r"(\d+(?:,\d{3})*(?:\.\d+)?)\s+(thousand|million|billion)\b", re.IGNORECASE)
_SCALE = {"thousand": 10**3, "million": 10**6, "billion": 10**9}


@dataclass(frozen=True)
class Unit:
    """One checkable fact of a text: its kind, normalised form and the text it came from."""

    kind: str  # number, ordinal, date, negation, name or word
    form: str  # digits, #N, YEAR-MM-DAY (? for a part left out), "not", or a word's stem
    text: str
    negated: bool = False  # the head a negation cue denies
    also: str = ""  # a word's other form: the stem of the word itself, beside its lemma's

    @property
    def key(self) -> str:
        """The form the source must hold: "not FORM" for a denied unit."""
        return f"not {self.form}" if self.negated else self.form

    def found(self, source: set[str]) -> bool:
        """Whether `source` (from `_source_forms`) holds the unit."""
        no = "not " if self.negated else ""
        return self.key in source or (bool(self.also) and no + self.also in source)


@functools.cache
def _stemmer() -> Any:
    from nltk.stem import porter  # rouge-score's own dependency and stemmer

    return porter.PorterStemmer()


@functools.cache
def _stems(word: str) -> tuple[str, str]:
    """The Porter stem of a lowercase word's lemma, and of the word itself: the lemma (simplemma,
    a dictionary) brings irregular forms together ("drew", "drawn" -> draw), the stem
    derivations ("restored", "restoration" -> restor)."""
    import simplemma

    stem = _stemmer().stem
    return str(stem(simplemma.lemmatize(word, lang="en").lower())), str(stem(word))


def _past_verb(word: str) -> bool:
    """Whether a lowercase word is a verb's past form ("attended" -> attend): a word ending in -ed
    whose dictionary lemma is another word. Such a word is the likeliest place for a faithful
    paraphrase to choose its own verb ("2099 people attended" for "drew 2099 people")."""
    import simplemma

    if len(word) < 5 or not word.endswith("ed"):
        return False
    lemma = str(simplemma.lemmatize(word, lang="en")).lower()
    return lemma != word and not lemma.endswith("ed")


def _digits(text: str) -> str:
    """`text` with its spelled numbers in digits (text2num: "seven" -> 7, "twenty-one" -> 21,
    "third" -> 3rd, "a hundred" -> a 100) and scale words applied ("464 thousand" -> 464000)."""
    from text_to_num import alpha2digit

    def scaled(m: re.Match[str]) -> str:
        value = float(m.group(1).replace(",", "")) * _SCALE[m.group(2).lower()]
        return _number(f"{value:f}")

    # threshold 0: "one" and "first" too ("no one" -> no 1), in the output and source alike
    return str(alpha2digit(_SCALED.sub(scaled, text), "en", threshold=0))


def _number(token: str) -> str:
    """A number's canonical digits: "12,400" -> 12400, "3.50" -> 3.5, "07" -> 7."""
    whole, _, frac = token.replace(",", "").partition(".")
    frac = frac.rstrip("0")
    return (whole.lstrip("0") or "0") + (f".{frac}" if frac else "")


def _date_form(kind: str, span: str) -> str:
    """A matched date as YEAR-MM-DAY, with ? for a part the text leaves out."""
    if kind == "iso":
        y, m, d = (int(p) for p in span.split("-"))
        return f"{y}-{m:02d}-{d}"
    month = next(_MONTHS[w[:3]] for w in re.findall(r"[a-z]+", span.lower()) if w[:3] in _MONTHS)
    numbers = [int(n) for n in re.findall(r"\d+", span)]
    year = next((str(n) for n in numbers if n >= 1000), "?")
    day = next((str(n) for n in numbers if n < 1000), "?")
    return f"{year}-{month:02d}-{day}"


def _units(text: str) -> list[Unit]:
    """The text's units in order, each negation cue's head marked as denied."""
    out: list[Unit] = []
    negate = False
    for m in _UNIT.finditer(_digits(text)):
        kind, token = m.lastgroup or "", m.group()
        if kind == "stop":
            negate = False
            continue
        if kind == "word":
            low = re.sub(r"['’](?:s|re|ve|ll|d|m)$", "", token.lower())  # "Voss's" -> voss
            if low.endswith(("n't", "n’t")) or low in NEGATIONS:
                out.append(Unit("negation", "not", token))
                negate = True if low == "nor" else not negate  # "not without" affirms
                continue
            if low in _CLAUSE_WORDS:
                negate = False
            if low in STOPWORDS or (len(low) < 3 and not token[0].isupper()):
                continue
            lemma, plain = _stems(low)
            kind = "name" if token[0].isupper() else "verb" if _past_verb(low) else "word"
            unit = Unit(kind, lemma, token, negate, plain if plain != lemma else "")
        elif kind == "number":
            unit = Unit("number", _number(token), token, negate)
        elif kind == "ordinal":
            unit = Unit("ordinal", f"#{_number(token[:-2])}", token, negate)
        else:
            unit = Unit("date", _date_form(kind, token), token, negate)
        negate = False
        out.append(unit)
    return out


def content_units(text: str) -> list[tuple[str, str]]:
    """The output's facts as (kind, form), each of which the source must hold: `number` (digits
    or number words, "seven" = 7), `ordinal` ("third" = "3rd" = #3), `date` ("March 3, 1999" =
    1999-03-3), `negation` (not, no, never, n't, without, ...), `name` (a capitalised
    non-stopword) and `word` (any other non-stopword of 3+ letters), words Porter-stemmed; a unit
    a negation denies reads "not FORM"."""
    return [(u.kind, u.key) for u in _units(text)]


def _source_forms(text: str) -> set[str]:
    """Every key under which an output's unit is found in `text`: its units (a word by its
    lemma's stem and its own), and each date's parts (year, month, day as an ordinal, and the
    partial dates it holds)."""
    forms: set[str] = set()
    for unit in _units(text):
        forms.add(unit.key)
        if unit.also:
            forms.add(f"not {unit.also}" if unit.negated else unit.also)
        if unit.kind != "date":
            continue
        year, month, day = unit.form.split("-")
        parts = {f"{year}-{month}-?", f"?-{month}-{day}", _stems(_MONTH_NAMES[int(month) - 1])[0]}
        parts.update(p for p in (year, f"#{day}") if "?" not in p)
        forms.update(f"not {p}" if unit.negated else p for p in parts)
    return forms


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, output: str) -> float | None:
    """ROUGE-L F1 of `output` against `reference` (None without a reference)."""
    if not reference.strip():
        return None
    return float(_rouge().score(reference, output)["rougeL"].fmeasure)


@dataclass(frozen=True)
class OverlapJudge:
    """Offline judge: supported when the document or question holds every fact of the output
    (`strict`) but for verbs' past forms, and at least `threshold` of all units; without
    `strict`, when it holds every number, ordinal, date, negation and name and at least
    `threshold` of all units."""

    threshold: float = 0.7
    strict: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise DiffbenchError(f"overlap threshold must lie in [0, 1], not {self.threshold}")

    @property
    def name(self) -> str:
        return f"overlap(threshold={self.threshold:g},strict={str(self.strict).lower()})"

    def judge(self, items: Sequence[JudgeInput]) -> list[Verdict]:
        return [self.judge_one(it) for it in items]

    def judge_one(self, item: JudgeInput) -> Verdict:
        """The verdict on one output."""
        source = _source_forms(f"{item.document}\n{item.question}")
        units = _units(item.output)
        missing = [u for u in units if not u.found(source)]
        score = 1.0 - len(missing) / len(units) if units else 0.0
        # A verb's past form the source lacks lowers the score but fails no output on its own:
        # it is how a faithful paraphrase differs most often ("attended" for "drew").
        hard = [u for u in missing if u.kind != "verb" and (self.strict or u.kind != "word")]
        supported = bool(units) and score >= self.threshold and not hard
        spans = tuple(dict.fromkeys(f"not {u.text}" if u.negated else u.text for u in missing))
        raw = "unsupported: " + ", ".join(spans) if spans else "all units supported"
        if not units:
            raw = "no content units in the output"
        return Verdict(
            supported, round(score, 6), raw, True, rouge_l(item.reference, item.output), spans
        )


# ---- llm: the Lookback Lens binary judge -------------------------------------------------------

JUDGE_SYSTEM = "You are a helpful assistant."
# The protocol's instruction, in our words; {what} is "summary" or "answer".
JUDGE_INSTRUCTION = (
    "You will see a document and a proposed {what}. Decide whether the proposed {what} can be "
    "directly inferred from the document. A {what} that holds any information the document does "
    "not contain is false; a {what} that differs from the ground truth {what} can still be true "
    "as long as nothing in it is false.\nExplain why the proposed {what} is true or false using "
    "only the document's content, ignoring any outside knowledge.\nAfter the explanation, end "
    "with **Conclusion: True** if the proposed {what} is completely accurate according to the "
    "document, or **Conclusion: False** if it holds any incorrect or unsupported information. "
    "When it is False, add **Problematic Spans: [the inaccurate spans of the {what}, as a Python "
    "list of strings]**."
)
JUDGE_CLOSING = (
    "Write the explanation first, then the final conclusion: **Conclusion: True** if the "
    "proposed {what} is completely accurate according to the document, or **Conclusion: False** "
    "if it holds any incorrect or unsupported information, followed by **Problematic Spans: "
    "[...]** when it is False."
)


def judge_prompt(item: JudgeInput, document: str | None = None) -> str:
    """The user message of the binary judge for one output (`document`: a shortened copy)."""
    what = item.kind
    doc = item.document if document is None else document
    context = f"#Document#: {doc}"
    if item.question.strip():
        context += f"\n#Question#: {item.question.strip()}"
    truth = "Summary" if what == "summary" else "Answer"
    return (
        f"{JUDGE_INSTRUCTION.format(what=what)}\n\n{context}\n\n"
        f"#Ground Truth {truth}#: {item.reference.strip()}\n\n"
        f"#Proposed {truth}#: {item.output.strip()}\n\n{JUDGE_CLOSING.format(what=what)}"
    )


# A verdict line as judges write it: "Conclusion: True", "**Conclusion**: **True**",
# "**Conclusion:** True", "Conclusion - False", "Conclusion:\nFalse", "Final answer: True".
_CONCLUSION = re.compile(
    r"(?:conclusion|final\s+(?:answer|verdict|judge?ment)|verdict)"
    r"[\s*_:=>#`'\"\-–—]{0,12}(?:(?:the\s+proposed\s+(?:answer|summary)\s+)?is\s+)?"
    r"[\s*_`'\"]*(true|false)\b",
    re.IGNORECASE,
)
# A reply whose last line is the bare verdict ("**False**", "True.").
_BARE = re.compile(r"[\s*_`'\"]*(true|false)[\s*_`'\".!]*", re.IGNORECASE)
_SPANS = re.compile(r"problematic spans\W{0,4}\s*(\[.*?\])", re.IGNORECASE | re.DOTALL)


def parse_verdict(text: str) -> bool | None:
    """The judge's conclusion: True, False, or None when it gives no readable one. The last
    verdict line counts ("Conclusion: True/False" in any markup, or "Final answer: ..."), as a
    judge may quote the instruction first; failing one, a last line that is only True or False."""
    found = _CONCLUSION.findall(text)
    if not found:
        lines = [line for line in text.splitlines() if line.strip()]
        bare = _BARE.fullmatch(lines[-1]) if lines else None
        found = [bare.group(1)] if bare else []
    return found[-1].lower() == "true" if found else None


def parse_spans(text: str) -> tuple[str, ...]:
    """The problematic spans the judge listed, as far as they can be read."""
    m = _SPANS.search(text)
    if not m:
        return ()
    try:
        spans = json.loads(m.group(1))
    except ValueError:
        spans = [s.strip().strip("'\"") for s in m.group(1)[1:-1].split(",")]
    return tuple(str(s) for s in spans if str(s).strip()) if isinstance(spans, list) else ()


def llm_verdict(reply: str) -> Verdict:
    """A judge reply as a verdict; an unreadable one is not hallucination-free."""
    conclusion = parse_verdict(reply)
    supported = conclusion is True
    return Verdict(
        supported, float(supported), reply, conclusion is not None, None, parse_spans(reply)
    )


def default_cache() -> Path:
    """Where judge replies are cached: $XDG_CACHE_HOME (or ~/.cache)/diffbench/judge.jsonl."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "diffbench" / "judge.jsonl"


@dataclass
class ResponseCache:
    """Judge replies by request digest, in a JSON Lines file shared safely between processes."""

    path: Path
    _entries: dict[str, str] = field(default_factory=dict)
    _read_at: int = -1

    def _refresh(self) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == self._read_at:
            return
        if size:
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry["reply"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from a killed writer
        self._read_at = size

    def get(self, key: str) -> str | None:
        """The cached reply for `key`, if any."""
        self._refresh()
        return self._entries.get(key)

    def put(self, key: str, reply: str) -> None:
        """Append one reply under the file's lock."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
            f.flush()
        self._entries[key] = reply


@dataclass
class EndpointJudge:
    """The binary judge over an OpenAI-compatible chat endpoint.

    The API key is read from the environment variable `api_key_env` at call time and goes
    nowhere else: not into the cache, the output or any message. Transient failures (connection,
    timeout, 429, 5xx) are retried `retries` times with exponential backoff; then one
    DiffbenchError names the endpoint.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    cache: Path | None = None
    retries: int = 4
    backoff_s: float = 1.0
    max_tokens: int = 512
    timeout_s: float = 120.0
    calls: int = 0  # replies fetched from the endpoint (not the cache): what a rerun must avoid
    _client: Any = None

    @property
    def name(self) -> str:
        return f"llm({self.model}@{self.base_url})"

    def _key(self, messages: list[dict[str, str]]) -> str:
        ident = {"base_url": self.base_url.rstrip("/"), "model": self.model,
                 "max_tokens": self.max_tokens, "temperature": 0, "messages": messages}  # fmt: skip
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def _openai(self) -> Any:
        if self._client is None:
            import openai

            key = os.environ.get(self.api_key_env) or "not-needed"  # a local server needs none
            self._client = openai.OpenAI(
                base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout_s
            )
        return self._client

    def judge(self, items: Sequence[JudgeInput]) -> list[Verdict]:
        return [llm_verdict(self.reply(judge_prompt(it))) for it in items]

    def reply(self, prompt: str) -> str:
        """The endpoint's reply to one judge prompt, from the cache when it holds it."""
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": prompt},
        ]
        key = self._key(messages)
        store = ResponseCache(self.cache or default_cache())
        cached = store.get(key)
        if cached is not None:
            return cached
        text = self._call(messages)
        store.put(key, text)
        self.calls += 1
        return text

    def _call(self, messages: list[dict[str, str]]) -> str:
        import openai

        transient = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        for attempt in range(self.retries + 1):
            try:
                out = self._openai().chat.completions.create(
                    model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens
                )
                return str(out.choices[0].message.content or "")
            except transient as err:
                if attempt == self.retries:
                    raise DiffbenchError(
                        f"judge endpoint {self.base_url} failed after {self.retries + 1} tries: "
                        f"{type(err).__name__}; samples judged so far are kept, rerun to resume"
                    ) from None
                delay = self.backoff_s * 2**attempt
                log.warning("judge endpoint: %s; retrying in %.1fs", type(err).__name__, delay)
                time.sleep(delay)
            except openai.APIStatusError as err:
                hint = f" (is ${self.api_key_env} set?)" if err.status_code in (401, 403) else ""
                raise DiffbenchError(
                    f"judge endpoint {self.base_url} refused the request with HTTP "
                    f"{err.status_code}{hint}: {_error_message(err)}"
                ) from None
        raise AssertionError("unreachable")


def _error_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return type(err).__name__


@dataclass
class BackendJudge:
    """The binary judge run locally through a diffbench backend (any model it can load).

    The judge prompt goes through the model's chat template when it has one; a document too long
    for the judge's context is cut, in the judge's own tokens, to fit.
    """

    spec: Any  # diffbench.models.ModelSpec
    max_tokens: int = 256
    batch: int = 8
    calls: int = 0
    _backend: Any = None

    @property
    def name(self) -> str:
        return f"llm({self.spec.spec}, local)"

    def _load(self) -> Any:
        if self._backend is None:
            from diffbench.models import check_spec, load_backend

            check_spec(self.spec)
            self._backend = load_backend(self.spec)
        return self._backend

    def judge(self, items: Sequence[JudgeInput]) -> list[Verdict]:
        from diffbench.api import GenerateRequest

        backend = self._load()
        view = backend.tokenizer_view()
        requests = []
        for it in items:
            user = f"{JUDGE_SYSTEM}\n\n{judge_prompt(it)}"
            prompt = view.render(user)
            room = view.max_context - self.max_tokens - view.prompt_tokens(prompt)
            if room < 0:  # cut the document, keeping the instruction and both proposals
                keep = max(0, view.count(it.document) + room - 8)
                doc = it.document[: view.char_offset(it.document, keep)]
                prompt = view.render(f"{JUDGE_SYSTEM}\n\n{judge_prompt(it, doc)}")
            requests.append(GenerateRequest(prompt, self.max_tokens))
        replies = backend.generate(requests)
        self.calls += len(requests)
        return [llm_verdict(g.text) for g in replies]

    def close(self) -> None:
        """Free the model."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def make_judge(
    kind: str,
    *,
    threshold: float = 0.7,
    strict: bool = True,
    base_url: str = "",
    model: str = "",
    api_key_env: str = "OPENAI_API_KEY",
    cache: Path | None = None,
    retries: int = 4,
    backoff_s: float = 1.0,
    local_model: str = "",
    max_tokens: int = 512,
) -> Judge:
    """A judge from options: `overlap`, or `llm` over an endpoint (`base_url`, `model`) or a
    local model (`local_model`, a diffbench model spec)."""
    if kind == "overlap":
        return OverlapJudge(threshold, strict)
    if kind != "llm":
        raise DiffbenchError(f"unknown judge {kind!r}: use overlap or llm")
    if local_model:
        if base_url:
            raise DiffbenchError(
                "the llm judge takes an endpoint (base URL) or a local model, not both"
            )
        from diffbench.models import ModelSpec

        return BackendJudge(ModelSpec("judge", local_model), max_tokens=max_tokens)
    if not base_url or not model:
        raise DiffbenchError(
            "the llm judge needs an endpoint and a model name (--base-url URL --model NAME) "
            "or a local model (--judge-model SPEC)"
        )
    if not re.match(r"^https?://", base_url):
        raise DiffbenchError(f"judge base URL {base_url!r} must start with http:// or https://")
    if retries < 0:
        raise DiffbenchError(f"judge retries must be >= 0, not {retries}")
    return EndpointJudge(
        base_url, model, api_key_env, cache, retries, backoff_s, max_tokens=max_tokens
    )


# ---- `diffbench judge FILE`: judge outputs made anywhere, resumably ---------------------------

OUTPUT_COLUMNS = ("id", "supported", "support_score", "parsed", "rouge_l", "spans", "verdict",
                  "judge")  # fmt: skip


def read_inputs(path: Path) -> list[JudgeInput]:
    """Rows of a JSON Lines file with `document` and `output` (and optional `question`,
    `reference`, `id`; without an id a row is named by its line number)."""
    out: list[JudgeInput] = []
    for n, row in read_objects(path, "judge input"):
        for key in ("document", "output"):
            if not isinstance(row.get(key), str):
                raise DiffbenchError(f"{path}: line {n} has no {key!r} text")
        optional = {k: row.get(k) or "" for k in ("question", "reference")}
        if not all(isinstance(v, str) for v in optional.values()):
            raise DiffbenchError(f"{path}: line {n}: question and reference must be text")
        rid = str(row["id"]) if row.get("id") not in (None, "") else f"line-{n}"
        out.append(JudgeInput(rid, row["document"], row["output"], **optional))
    ids = [it.id for it in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DiffbenchError(f"{path}: id {dup!r} appears more than once")
    if not out:
        raise DiffbenchError(f"{path} holds no rows to judge")
    return out


def _output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DiffbenchError(f"judge --output {path}: use a .jsonl or .csv file name")
    return suffix[1:]


def _read_done(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Rows already judged in an output file (a torn last line is dropped)."""
    if not path.exists():
        return []
    import csv

    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "id" in row:
                    rows.append(row)
        else:
            for row in csv.DictReader(f):
                if row.get("judge") and row.get("verdict") is not None:
                    rows.append(dict(row))
    return rows


def _write_rows(path: Path, fmt: str, rows: list[dict[str, Any]], mode: str) -> None:
    import csv

    with path.open(mode, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
        else:
            writer = csv.DictWriter(f, fieldnames=OUTPUT_COLUMNS)
            if mode == "w":
                writer.writeheader()
            for row in rows:
                spans = row["spans"]  # a list, or the text a CSV row read back holds
                text = spans if isinstance(spans, str) else json.dumps(spans, ensure_ascii=False)
                writer.writerow({**row, "spans": text})
                f.flush()


@dataclass(frozen=True)
class JudgeSummary:
    n: int
    supported: int
    unparseable: int
    newly_judged: int

    @property
    def rate(self) -> float:
        """The hallucination-free rate."""
        return self.supported / self.n if self.n else float("nan")


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def judge_file(inputs: Path, output: Path, judge: Judge, progress: Any = None) -> JudgeSummary:
    """Judge every row of `inputs` into `output` (JSON Lines or CSV by its extension), skipping
    rows that file already holds; each verdict is written as soon as it is made (a local model
    judges `batch` rows at a time)."""
    chunk = int(getattr(judge, "batch", 1))
    fmt = _output_format(output)
    items = read_inputs(inputs)
    done = _read_done(output, fmt)
    others = sorted({str(r.get("judge")) for r in done} - {judge.name})
    if others:
        raise DiffbenchError(
            f"{output} holds verdicts of another judge ({others[0]}); give a new --output"
        )
    known = {it.id for it in items}
    done = [r for r in done if str(r["id"]) in known]
    _write_rows(output, fmt, done, "w")  # drop a torn line before appending
    judged = {str(r["id"]) for r in done}
    todo = [it for it in items if it.id not in judged]
    if todo:
        log.info("judging %d rows with %s (%d already judged)", len(todo), judge.name, len(done))
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        rows = [{"id": it.id, **v.as_row(), "judge": judge.name}
                for it, v in zip(part, judge.judge(part), strict=True)]  # fmt: skip
        _write_rows(output, fmt, rows, "a")
        done += rows
        if progress is not None:
            progress(len(done), len(items))
    supported = sum(_truthy(r["supported"]) for r in done)
    unparseable = sum(not _truthy(r["parsed"]) for r in done)
    return JudgeSummary(len(done), supported, unparseable, len(todo))


# ---- the `diffbench judge` command ------------------------------------------------------------


def add_command(sub: Any, path_type: Any) -> None:
    """Add `diffbench judge` to the CLI's subcommands."""
    j = sub.add_parser(
        "judge",
        help="judge outputs made anywhere for contextual hallucination (resumable)",
        description="Rows of FILE.jsonl need document and output (question, reference, id "
        "optional); OUT gets one row per input with id, supported, support_score and the raw "
        "verdict, as JSON Lines or CSV by its extension.",
    )
    j.add_argument("input", type=path_type, metavar="FILE.jsonl")
    j.add_argument("--judge", choices=("overlap", "llm"), default="overlap")
    j.add_argument("--output", type=path_type, required=True, metavar="OUT.jsonl|OUT.csv")
    j.add_argument(
        "--lenient",
        action="store_true",
        help="overlap: content words pass at --threshold (numbers, ordinals, dates, negations and "
        "names must still all be found); by default every unit must be",
    )
    j.add_argument("--threshold", type=float, default=0.7, help="overlap --lenient: share held")
    j.add_argument("--base-url", default="", help="llm: an OpenAI-compatible endpoint (…/v1)")
    j.add_argument("--model", default="", help="llm: the endpoint's model name")
    j.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="llm: NAME of the environment variable holding the key (never stored)",
    )
    j.add_argument("--judge-model", default="", help="llm: judge locally with this model spec")
    j.add_argument("--cache", type=path_type, help="llm: reply cache (default ~/.cache/diffbench)")
    j.add_argument("--retries", type=int, default=4, help="llm: retries per request (backoff)")
    j.add_argument("--max-tokens", type=int, default=512, help="llm: the judge's reply budget")


def run_command(args: Any) -> int:
    """`diffbench judge`: judge a file, print the hallucination-free rate."""
    _output_format(args.output)
    if args.output.is_dir():
        raise DiffbenchError(f"--output {args.output} is a folder; give a .jsonl or .csv file")
    if not args.output.parent.is_dir():
        raise DiffbenchError(f"--output {args.output}: {args.output.parent} is not a folder")
    if args.input.resolve() == args.output.resolve():
        raise DiffbenchError("--output must not be the input file")
    if args.max_tokens < 1:
        raise DiffbenchError(f"--max-tokens must be >= 1, not {args.max_tokens}")
    judge = make_judge(
        args.judge,
        threshold=args.threshold,
        strict=not args.lenient,
        base_url=args.base_url,
        model=args.model,
        api_key_env=args.api_key_env,
        cache=args.cache,
        retries=args.retries,
        local_model=args.judge_model,
        max_tokens=args.max_tokens,
    )
    read_inputs(args.input)  # bad input fails before any model loads
    try:
        summary = judge_file(args.input, args.output, judge)
    finally:
        if isinstance(judge, BackendJudge):
            judge.close()
    print(
        f"hallucination-free: {summary.rate:.3f} ({summary.supported}/{summary.n}); "
        f"unparseable verdicts: {summary.unparseable}; newly judged: {summary.newly_judged}; "
        f"judge: {judge.name}; wrote {args.output}"
    )
    return 0
