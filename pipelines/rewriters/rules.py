"""The offline rewriter: keyword prompt -> narrative sentence by rules, no model.

It is deterministic, needs nothing installed and handles the common shapes of gallery prompts
well enough to be the quickstart's default and a baseline for the model-based rewriters:

1. Remove prompt syntax: LoRA/embedding/hypernetwork tags ``<lora:name:0.8>``, weights
   ``(word:1.3)`` and ``word::2``, emphasis ``((word))`` ``[word]`` ``{word}``, prompt editing
   ``[from:to:0.5]`` (keeps ``to``, what the image ends as), alternation ``[a|b]`` (keeps ``a``),
   ``BREAK``, Midjourney parameters ``--ar 16:9``.
2. Split into comma-separated pieces and drop boilerplate: quality and resolution tags, style and
   medium words, render engines, camera and lens terms, site names, artist clauses ("by X",
   "in the style of X"), Danbooru/Pony meta tags. The lists below are the maintained part.
3. Build a sentence from what is left: the first piece is the subject; body-part attributes
   ("red hair") become "with red hair"; pieces starting with a preposition or verb follow as
   they are; "X background" becomes "on a X background"; bare settings and times of day get a
   preposition ("in a forest", "at sunset"). Small numbers become words ("3 cats" -> "three
   cats", "1girl" -> "a girl").

Bump :data:`RULES_VERSION` whenever the output for some input changes: it is part of the
rewrite cache key, so outputs of the old rules are redone.
"""

from __future__ import annotations

import re
from typing import ClassVar

from pipelines.rewriters.base import ItemFailed, Rewriter, RewriteRequest

RULES_VERSION = "v2"

NUMBER_WORDS = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
    7: "seven", 8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve",
}  # fmt: skip

# Whole pieces that say nothing about what the image shows (compared lower-case).
BOILERPLATE = frozenset(
    [
        "best quality", "high quality", "highest quality", "top quality", "good quality",
        "amazing quality", "ultra high quality", "normal quality", "very aesthetic",
        "ultra detailed", "ultra-detailed", "highly detailed", "extremely detailed",
        "very detailed", "insanely detailed", "hyper detailed", "intricate details",
        "intricate detail", "fine details", "ultra realistic", "ultra-realistic",
        "hyper realistic", "photo realistic", "sharp focus", "soft focus",
        "trending on artstation", "trending on pixiv", "trending on deviantart",
        "featured on artstation", "artstation hq", "award winning", "award-winning",
        "award winning photo", "award winning photography", "octane render", "unreal engine",
        "unreal engine 5", "unreal engine 4", "3d render", "ray tracing", "ray traced",
        "global illumination", "subsurface scattering", "cinematic lighting", "cinematic light",
        "volumetric lighting", "volumetric light", "dramatic lighting", "studio lighting",
        "soft lighting", "rim lighting", "rim light", "natural lighting", "beautiful lighting",
        "perfect lighting", "god rays", "dynamic lighting", "dynamic pose", "depth of field",
        "shallow depth of field", "film grain", "chromatic aberration", "lens flare",
        "wide angle", "wide-angle", "wide shot", "full shot", "raw photo", "raw photograph",
        "professional photography", "analog photo", "film photo", "digital art",
        "digital painting", "digital illustration", "concept art", "oil painting",
        "matte painting", "line art", "anime style", "anime art", "flat vector art",
        "vector art", "flat design", "clean background", "simple background",
        "plain background", "sharp details", "vibrant colors", "vivid colors",
        "masterpiece", "absurdres", "highres", "hires", "lowres", "intricate", "detailed",
        "hyperdetailed", "hyperrealistic", "hyperrealism", "photorealistic", "photorealism",
        "realistic", "realism", "uhd", "hdr", "hd", "fhd", "sharp", "focus", "artstation",
        "pixiv", "deviantart", "cgsociety", "behance", "octane", "ue5", "ue4", "redshift",
        "vray", "v-ray", "blender", "cinema4d", "c4d", "render", "rendered", "raytracing",
        "cinematic", "volumetric", "dof", "bokeh", "grain", "vignette", "close-up", "closeup",
        "macro", "dslr", "photography", "illustration", "painting", "watercolor",
        "watercolour", "sketch", "lineart", "cartoon", "comic", "flat", "minimalism",
        "minimalist", "minimal", "art", "beautiful", "stunning", "gorgeous", "epic", "amazing",
        "breathtaking", "elegant", "cute", "pretty", "aesthetic", "trending", "smooth",
        "clean", "colorful", "symmetrical", "symmetry", "centered", "solo", "looking at viewer",
        "official art", "wallpaper", "4k wallpaper", "8k wallpaper", "8k uhd", "4k uhd",
        "extremely detailed cg unity 8k wallpaper", "illustration art", "atmospheric",
        "moody", "ethereal", "dreamy", "whimsical", "majestic", "fantasy", "dark fantasy",
        "high fantasy", "fantasy art", "surreal", "surrealism", "detailed face",
        "detailed eyes", "beautiful detailed eyes", "perfect face", "perfect hands",
        "background", "detailed background", "matte", "depth", "blush", "heroic", "open mouth",
    ]
)  # fmt: skip

# Pieces matching any of these are boilerplate too.
BOILERPLATE_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        r"^\d+k\b",  # 8k, 4k uhd, 16k resolution
        r"^\d+ ?(?:mm|megapixels?)$",  # 35mm, 50 mm
        r"^(?:f|ƒ) ?/ ?\d",  # f/1.8
        r"^(?:iso|shutter speed|exposure)\b",
        r"^(?:canon|nikon|sony|fujifilm|fuji|leica|hasselblad|kodak|portra|ektar)\b",
        # artist clauses: "by X", "art by X", "photographed by X"
        r"^(?:(?:art|artwork|painting|illustration|drawing|style|photo|photograph|photography"
        r"|painted|drawn|illustrated|photographed|created|designed|rendered|sculpted|made)\s+)?"
        r"by\s",
        r"^(?:in the style of|style of|inspired by|in style of)\s",
        r"^(?:trending|featured|popular) on\b",
        r"^(?:score|rating|source)_\w+$",  # Pony/Danbooru meta tags
        r"^(?:best|high|highest|top|ultra|masterpiece|good|amazing|great|perfect|\w+)"
        r" (?:quality|resolution)$",
        r"^(?:ultra|very|highly|extremely|insanely|super|hyper)[ -]?"
        r"(?:detailed|realistic|sharp|quality)$",
        r"^(?:unreal|octane|redshift|vray|arnold|corona|cycles) ?(?:engine|render)?(?: \d+)?$",
        r"\b(?:wallpaper|unity 8k)\b",
        r"^(?:photo|picture|image|illustration|painting|render|drawing) of$",
        r"^(?:shot|taken|photographed|captured) (?:on|with)\b",
        r"(?:^style\b|\bstyle$|\baesthetics?$)",  # "anime style", "blade runner style"
        r"^embedding:",  # textual-inversion embeddings: (embedding:EasyNegative)
        r"\blighting$|^(?:natural|soft|warm|cold|hard|studio|ambient|rim|back) ?light$",
        r"\b(?:photography|photoshoot|photo shoot)$|^national geographic\b",
        r"^\d+ ?mm lens$|\blens$|^(?:motion|gaussian|radial) blur$|^soft shadows?$",
        r"^(?:cowboy|full body|upper body|half body|close|wide|medium|long|establishing) shot$",
        r"^(?:full|upper|lower) body$|^(?:male|female) focus$",
        r"^from (?:below|above|side|behind)$",
        r"^(?:isometric|top-down|aerial|side|front|bird's eye|birds eye) view$|^isometric$",
        r"^(?:low|high) poly$|^lowpoly$|^polaroid$|^film noir$|^impasto$|^\d{4}s$",
    )
)

# Names of artists that prompts list without "by" (the most common ones in public prompt
# datasets); the "by X" form is caught for any name.
KNOWN_ARTISTS = frozenset(
    [
        "greg rutkowski", "artgerm", "stanley artgerm lau", "wlop", "alphonse mucha", "mucha",
        "james jean", "ross tran", "rossdraws", "ilya kuvshinov", "makoto shinkai",
        "thomas kinkade", "beeple", "simon stalenhag", "craig mullins", "loish", "sakimichan",
        "krenz cushart", "magali villeneuve", "boris vallejo", "frank frazetta", "h.r. giger",
        "hr giger", "zdzislaw beksinski", "studio ghibli", "hayao miyazaki", "jakub rozalski",
        "peter mohrbacher", "charlie bowater", "tom bagshaw", "ruan jia", "john singer sargent",
        "rembrandt", "van gogh", "vincent van gogh", "claude monet", "monet", "moebius",
        "kim jung gi", "wes anderson", "tim burton", "james gurney", "jordan grimmer",
        "marc simonetti", "android jones", "dan mumford", "yoji shinkawa", "ivan aivazovsky",
        "albert bierstadt", "caspar david friedrich", "gustav klimt", "salvador dali", "pixar",
        "disney", "dreamworks", "annie leibovitz", "steve mccurry", "gil elvgren",
        "norman rockwell",
    ]
)  # fmt: skip

# A trailing "by X" clause inside a piece ("a castle on a hill by greg rutkowski"), unless the
# word before "by" is a participle that makes it content ("lit by candles", "surrounded by").
_TRAILING_ARTIST = re.compile(
    r"^(?P<head>.+?)\s+(?:(?P<verb>[a-z]+)\s+)?by\s+(?!the\b|a\b|an\b|his\b|her\b|its\b|their\b"
    r"|my\b|our\b|this\b|that\b|two\b|three\b|some\b|many\b)(?P<tail>[^,]+)$"
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_ARTIST_VERBS = _words(
    "painted drawn illustrated created designed rendered art artwork photographed sculpted made "
    "painting illustration"
)
_CONTENT_PARTICIPLES = re.compile(r"(?:ed|lit|held|ridden|worn|eaten|sitting|standing|hidden)$")

CLOTHING = _words(
    "dress shirt t-shirt jacket coat raincoat hat cap helmet armor armour suit kimono hoodie "
    "uniform gown skirt robe cloak cape scarf sweater jeans boots shoes glasses sunglasses "
    "gloves mask crown tie bikini swimsuit apron overalls"
)
PLURAL_CLOTHING = _words("boots shoes glasses sunglasses gloves jeans overalls")
# Settings that take another preposition than "in".
SETTING_PREPOSITIONS = {
    "beach": "on", "street": "on", "road": "on", "stage": "on", "island": "on",
    "sea": "by", "ocean": "by", "lake": "by", "river": "by", "waterfall": "by",
}  # fmt: skip
BODY_PARTS = _words(
    "hair eyes eye beard skin lips ears tail wings horns fur feathers mustache moustache "
    "freckles teeth nose face"
)
_VAGUE_PARTS = _words("hair eyes eye skin lips ears nose face teeth")
SETTINGS = _words(
    "forest jungle beach desert city street alley road park garden field meadow farm village "
    "mountains mountain hills valley lake river ocean sea waterfall cave castle palace temple "
    "church library kitchen bedroom classroom office room hallway market cafe restaurant bar "
    "space snow swamp island harbor harbour port station subway countryside town cityscape "
    "landscape underwater sky clouds ruins battlefield arena stage studio"
) | {"outer space", "train station"}
# Bare settings that take "the": "in the snow", "in the desert".
_THE_SETTINGS = _words(
    "snow rain fog sky clouds countryside desert jungle mountains hills ocean sea"
)
_PLURAL_SETTINGS = _words("mountains hills ruins clouds woods")
TIMES = _words(
    "sunset sunrise dawn dusk night midnight noon twilight daytime nighttime morning evening "
    "afternoon"
) | {"golden hour", "blue hour"}
# Words a piece may start with to follow the subject as it is ("in a forest", "holding a cup").
_JOINING_WORDS = re.compile(
    r"^(?:in|on|at|under|over|above|below|near|beside|behind|inside|outside|with|without|"
    r"wearing|holding|carrying|riding|standing|sitting|walking|running|flying|playing|eating|"
    r"drinking|reading|looking|lying|sleeping|jumping|dancing|swimming|surrounded|covered|"
    r"made|during|from|of|against|among|between|through|across|along|around|and)\b"
)
_DANBOORU_COUNT = re.compile(r"^(\d+)(girl|boy|other)s?$")


def strip_prompt_syntax(prompt: str) -> str:
    text = prompt.replace("\\(", "\x00").replace("\\)", "\x01")  # escaped literal parentheses
    text = re.sub(r"<[^<>]*>", " ", text)  # <lora:x:0.8>, <hypernet:...>, <embedding>
    text = re.sub(r"\s--[a-z]+(?:\s+[^\s,-][^\s,]*)?", " ", text)  # --ar 16:9 --v 5 --style raw
    text = re.sub(r"\bBREAK\b", ",", text)
    text = re.sub(r"::-?[\d.]*", ",", text)  # Midjourney multi-prompt weights
    for _ in range(5):  # nested emphasis, innermost first
        previous = text
        text = re.sub(r"\[([^\[\]:|]*):([^\[\]:|]*):[\d.]+\]", r"\2", text)  # [from:to:when]
        text = re.sub(r"\[([^\[\]|]*)\|[^\[\]]*\]", r"\1", text)  # [a|b] alternation
        text = re.sub(r"\(([^()]*?)\s*:\s*-?[\d.]+\s*\)", r"\1", text)  # (word:1.2)
        text = re.sub(r"\(([^()]*)\)", r"\1", text)  # (word)
        text = re.sub(r"\[([^\[\]]*)\]", r"\1", text)  # [word]
        text = re.sub(r"\{([^{}]*)\}", r"\1", text)  # {word}
        if text == previous:
            break
    text = re.sub(r"[()\[\]{}]", " ", text)  # unbalanced leftovers
    return text.replace("\x00", "(").replace("\x01", ")")


_MEDIUM_PREFIX = re.compile(
    r"^(?:an? )?(?:(?:digital |oil |matte |concept )?(?:photo|photograph|picture|image|"
    r"illustration|painting|drawing|render|sketch|watercolou?r|art|artwork)) of\s+",
    re.IGNORECASE,
)
_QUALITY_ADJECTIVES = re.compile(
    r"^(?:(?:highly |very |extremely |ultra |hyper |insanely )?detailed|intricate|beautiful|"
    r"perfect|gorgeous|stunning|amazing|epic|realistic)\s+",
    re.IGNORECASE,
)


def _normalise_piece(piece: str) -> str:
    piece = re.sub(r"\s+", " ", piece).strip(" .;:!-_\"'")
    if " " not in piece:
        piece = piece.replace("_", " ")  # Danbooru tags: long_hair
    piece = _MEDIUM_PREFIX.sub("", piece)
    return _QUALITY_ADJECTIVES.sub("", piece) if piece.count(" ") >= 1 else piece


def _numbers_to_words(piece: str) -> str:
    match = _DANBOORU_COUNT.match(piece)
    if match:
        count, noun = int(match.group(1)), match.group(2)
        if count == 1:
            return f"a {noun}"
        return f"{NUMBER_WORDS.get(count, str(count))} {noun}s"
    return re.sub(
        r"\b(\d{1,2})\b(?!\s*(?:%|:|/|\.\d))",
        lambda m: NUMBER_WORDS.get(int(m.group(1)), m.group(1)),
        piece,
    )


def _drop_trailing_artist(piece: str) -> str:
    match = _TRAILING_ARTIST.match(piece.lower())
    if not match:
        return piece
    verb = match.group("verb")
    if verb and verb not in _ARTIST_VERBS:
        if _CONTENT_PARTICIPLES.search(verb):
            return piece  # "lit by candles", "surrounded by wolves"
        return piece[: match.end("verb")]  # "a dog running by greg rutkowski" keeps "running"
    return piece[: match.end("head")].rstrip(" ,")


def is_boilerplate(piece: str) -> bool:
    lowered = piece.lower().strip()
    if len(re.sub(r"[^a-z]", "", lowered)) < 2:  # "d" of ":d", "^_^", "1"
        return True
    return (
        lowered in BOILERPLATE
        or lowered in KNOWN_ARTISTS
        or any(p.search(lowered) for p in BOILERPLATE_PATTERNS)
    )


def content_pieces(prompt: str) -> list[str]:
    """The pieces of a keyword prompt that describe the image, syntax and boilerplate removed."""
    pieces, seen = [], set()
    for raw in re.split(r"[,;|\n]", strip_prompt_syntax(prompt)):
        if is_boilerplate(raw.strip()):  # before "_" becomes " ": score_8_up, rating_safe
            continue
        piece = _normalise_piece(raw)
        if not piece or is_boilerplate(piece):
            continue
        piece = _drop_trailing_artist(piece)
        if not piece or is_boilerplate(piece):
            continue
        piece = _numbers_to_words(piece)
        if piece.lower() not in seen:
            seen.add(piece.lower())
            pieces.append(piece)
    return pieces


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


_DETERMINER = re.compile(r"^(?:a|an|the|two|three|four|five|six|some|many|his|her|their)\b")


def _with_article(phrase: str) -> str:
    return phrase if _DETERMINER.match(phrase) else f"{_article(phrase)} {phrase}"


def _time_phrase(piece: str) -> str:
    if piece in ("morning", "evening", "afternoon"):
        return f"in the {piece}"
    if piece in TIMES:
        return f"at {piece}"
    return f"on {_with_article(piece)}"  # "on a rainy night", "on a sunny morning"


def _setting_phrase(piece: str) -> str:
    if piece in ("space", "outer space", "underwater"):
        return piece if piece == "underwater" else f"in {piece}"
    if piece in _THE_SETTINGS or piece.split()[-1] in _PLURAL_SETTINGS:
        return f"in the {piece}"  # "in the snow", "in the snowy mountains"
    preposition = SETTING_PREPOSITIONS.get(piece.split()[-1], "in")
    return f"{preposition} {_with_article(piece)}"


def _clothing_phrase(piece: str) -> str:
    if piece.split()[-1] in PLURAL_CLOTHING or _DETERMINER.match(piece):
        return f"wearing {piece}"
    return f"wearing {_article(piece)} {piece}"


def rewrite_by_rules(prompt: str) -> str:
    """A narrative sentence built from ``prompt``'s content pieces ('' if none are left)."""
    pieces = content_pieces(prompt)
    if not pieces:
        return ""
    subject, rest = pieces[0], pieces[1:]
    attributes, following, settings, times, others = [], [], [], [], []
    for piece in rest:
        lowered = piece.lower()
        words = lowered.split()
        if _JOINING_WORDS.match(lowered):
            following.append(piece)  # "in a garden", "holding a cup": already a phrase
        elif words[-1] in TIMES or lowered in TIMES:
            times.append(_time_phrase(lowered))
        elif words[-1] == "background":
            settings.append(f"on {_with_article(lowered)}")
        elif (lowered in SETTINGS or words[-1] in SETTINGS) and len(words) <= 3:
            settings.append(_setting_phrase(lowered))
        elif words[-1] in BODY_PARTS and len(words) <= 4:
            if len(words) > 1 or words[0] not in _VAGUE_PARTS:  # a bare "eyes" says nothing
                attributes.append(piece)
        elif words[-1] in CLOTHING and len(words) <= 4:
            following.append(_clothing_phrase(piece))
        else:
            others.append(piece)
    sentence = subject
    if attributes:
        sentence += " with " + _join_and(attributes)
    for piece in following:
        sentence += " " + piece
    if others:
        sentence += ", " + _join_and(others) + ","
    for phrase in settings + times:
        sentence += " " + phrase
    return re.sub(r"\s+", " ", sentence).strip(" ,")


class RulesRewriter(Rewriter):
    """The rules above behind the rewriter interface. Deterministic: a retry would give the same
    answer, so an invalid answer fails at once."""

    backend: ClassVar[str] = "rules"
    can_retry: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(RULES_VERSION)  # origin "rules:v2"

    def generate(self, requests: list[RewriteRequest], attempt: int) -> list[str | ItemFailed]:
        answers: list[str | ItemFailed] = []
        for request in requests:
            sentence = rewrite_by_rules(request.complex_prompt)
            answers.append(sentence or ItemFailed("no-content", "only style words and syntax"))
        return answers
