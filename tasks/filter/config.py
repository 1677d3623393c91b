"""The `filter` section of a pipeline config: every rule's threshold (null turns a rule off)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# C4's policy substrings (datatrove's POLICY_SUBSTRINGS), lowercase.
POLICY_PHRASES = ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"]

# Page furniture that ends like a sentence ("© 2019 Dow Jones & Company, Inc. All Rights
# Reserved."), so the punctuation rule keeps it. Each phrase was checked against the lines of
# gutenberg_en (none has them) and of messy_web (they are in boilerplate lines 10-60 times as
# often as in article bodies), so the messy_web figures they improve are not an unseen test.
# ("share this" was dropped from the list: TinyStories says "Let's share this ice cream!").
BOILERPLATE_PHRASES = [
    "all rights reserved",
    "©",
    "newsletter",
    "terms of service",
    "click here",
    "skip to",
    "contact us",
    "your email",
    "email address",
]


class FilterConfig(BaseModel):
    """Every threshold can be set to null (and every switch to false) to turn its rule off."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int | None = Field(100, ge=0, description="drop documents shorter than this many characters (not CJK)")
    # Language
    languages: list[str] | None = Field(
        ["en", "zh", "ja"], description="ISO 639-1 codes of the languages to keep (null: keep every language)"
    )
    min_language_score: float = Field(
        0.65, ge=0, le=1, description="drop when the detected language's confidence is below this"
    )
    langid_chars: int = Field(500, ge=50, description="the language is judged on this many leading characters")
    langid_min_letters: int = Field(
        20, ge=0, description="documents with fewer letters in that prefix are kept (language 'unknown')"
    )
    langid_low_accuracy: bool = Field(
        True,
        description="lingua's trigram-only mode (about 60 MB and 0.3 s to load per process, against 1 GB "
        "and 7 s; same decisions on the sample corpora, weaker under ~120 characters)",
    )
    # C4 line rules, judged per paragraph (wrapped lines joined)
    join_wrapped_lines: bool = Field(True, description="judge hard-wrapped paragraphs, not single lines")
    # 25, not the ~70 of a typical wrap: verse goes on in lines of 25-40 characters (judged
    # with 40, 16% of tinyshakespeare's lines were dropped; with 25, under 2%).
    wrap_min_chars: int = Field(
        25, ge=1, description="a line this long that does not end a sentence is a wrapped line (CJK: a quarter)"
    )
    line_terminal_punct: bool = Field(
        True,
        description="drop paragraphs that do not end in . ! ? or a closing quote (not CJK: Chinese verse "
        "ends its lines without punctuation)",
    )
    line_min_words: int | None = Field(3, ge=0, description="drop paragraphs with fewer words (CJK: characters)")
    line_min_words_unless_sentence: bool = Field(
        True, description="the word minimum spares paragraphs that end a sentence (“No.” in a novel)"
    )
    line_max_word_chars: int | None = Field(1000, ge=1, description="drop lines with a longer word")
    line_javascript: bool = Field(True, description="drop lines that mention javascript")
    line_policy_phrases: list[str] | None = Field(
        POLICY_PHRASES, description="drop lines with any of these phrases (lowercase; C4's list)"
    )
    line_boilerplate_phrases: list[str] | None = Field(
        BOILERPLATE_PHRASES, description="drop lines with any of these phrases too (footers, sign-up boxes; lowercase)"
    )
    strip_citations: bool = Field(True, description="remove Wikipedia markers [1], [edit], [citation needed]")
    # Pages repeat their headline, teasers and "Got a Tip?" boxes; judged whole, such a page fails
    # FineWeb's 1% duplicated-line rule and loses its article too. Dropping the later copies
    # keeps the article (books rarely repeat a paragraph of 4+ words within a chunk).
    line_drop_repeats: bool = Field(
        True, description="drop later copies of a paragraph (of `repeat_min_words`+ words) seen earlier in the text"
    )
    # C4 document rules
    drop_lorem_ipsum: bool = Field(True, description="drop documents with 'lorem ipsum'")
    drop_curly_bracket: bool = Field(True, description="drop documents with '{' (code, templates)")
    min_sentences: int | None = Field(5, ge=0, description="fewer sentences left after the line rules (not CJK)")
    # Gopher quality
    min_words: int | None = Field(50, ge=0, description="fewer words than this")
    max_words: int | None = Field(100_000, ge=1, description="more words (CJK: characters) than this")
    cjk_min_words: int | None = Field(
        16, ge=0, description="CJK text: fewer characters than this (in place of min_chars and min_words)"
    )
    min_mean_word_length: float | None = Field(3.0, ge=0, description="mean word length below this (not for CJK)")
    max_mean_word_length: float | None = Field(10.0, ge=0, description="mean word length above this (not for CJK)")
    max_hash_ratio: float | None = Field(0.1, ge=0, description="'#' per word above this")
    max_ellipsis_ratio: float | None = Field(0.1, ge=0, description="'...' or '…' per word above this")
    max_bullet_lines: float | None = Field(
        0.9, ge=0, le=1, description="fraction of non-blank lines starting with '•' or '-' above this"
    )
    max_ellipsis_lines: float | None = Field(
        0.3, ge=0, le=1, description="fraction of non-blank lines ending with an ellipsis above this"
    )
    min_alpha_words: float | None = Field(0.8, ge=0, le=1, description="fraction of words with a letter below this")
    min_stop_words: int | None = Field(
        2,
        ge=0,
        description="fewer English stop words (the, be, to, of, and, that, have, with); English-looking text only",
    )
    # Gopher repetition
    max_dup_paragraphs: float | None = Field(
        0.3, ge=0, le=1, description="fraction of paragraphs that repeat an earlier one above this"
    )
    max_dup_paragraph_chars: float | None = Field(
        0.2, ge=0, le=1, description="characters in repeated paragraphs / all characters above this"
    )
    max_dup_lines: float | None = Field(
        0.3, ge=0, le=1, description="fraction of lines that repeat an earlier one above this"
    )
    max_dup_line_chars: float | None = Field(
        0.2, ge=0, le=1, description="characters in repeated lines / all characters above this"
    )
    # Speaker names in a play ("LADY ANNE:") and scene breaks ("*     *     *") repeat by design:
    # counted as repetitions they dropped 4% of tinyshakespeare's chunks and Dracula's log entries.
    repeat_min_words: int = Field(4, ge=0, description="lines and paragraphs with fewer words never count as repeated")
    top_ngram_chars: dict[int, float] | None = Field(
        {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max share of characters covered by the most frequent word n-gram (CJK: character n-gram)",
    )
    dup_ngram_chars: dict[int, float] | None = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max share of characters covered by repeated word n-grams (CJK: character n-grams)",
    )
    # FineWeb quality
    fineweb_min_punct_paragraphs: float | None = Field(
        0.12, ge=0, le=1, description="share of paragraphs ending in terminal punctuation below this (not CJK)"
    )
    fineweb_max_short_lines: float | None = Field(
        0.67, ge=0, le=1, description="share of lines of at most `fineweb_short_line_chars` above this (not CJK)"
    )
    fineweb_short_line_chars: int = Field(30, ge=1, description="a short line has at most this many characters")
    fineweb_max_dup_line_chars: float | None = Field(
        0.01, ge=0, le=1, description="characters in repeated lines (of `repeat_min_words` or more) above this share"
    )
    fineweb_max_newlines_per_word: float | None = Field(0.3, ge=0, description="newlines per word above this")
    # Script heuristics
    cjk_fraction: float = Field(
        0.3, ge=0, le=1, description="above this share of CJK characters, count characters instead of words"
    )
    english_fraction: float = Field(
        0.9, ge=0, le=1, description="the stop-word rule applies when at least this share of letters is ASCII"
    )
