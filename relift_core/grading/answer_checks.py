"""Cheap, pure-Python checks on a boxed maths answer, run before math-verify sees it.

math-verify is built to be lenient with honest answers, and that leniency can be gamed: given
`\\boxed{43 = 42}` it compares the right-hand side, `42 \\approx 43` and `\\geq 42` parse as 42,
`\\text{...}` is dropped, an unparseable `\\let\\x=42` or `2e,,(=42\\lim` falls back to the
last number, and juxtaposed numbers are read as a mixed number (`20 22`, `(20)(22)` and `2(40)`
all become 42). Parsing and sympy can also be made to run for seconds: nesting (the parser's
cost grows with depth), towers of powers, factorial chains and symbolic expansions.

`rejection(predicted, gold)` says why an answer is refused (a short reason) or returns None.
The rule it enforces: an answer counts only if the boxed expression AS A WHOLE is a candidate
for equality with the gold, so every structural feature that lets math-verify judge a PART of
the answer must be matched by the same structure in the gold:

* relations (`=`, `<`, `\\le`, `\\approx`, `\\in`, ...) must be the gold's relations; the one
  exception is an assignment to a single variable (`x = 42` for `42`, and `42` for `x = 42`);
* separators of alternatives (`,`, `;`, `\\pm`, `\\lor`, `\\cup`, `\\\\`, `&`, `:`, `\\dots`)
  may not be more numerous than in the gold, so a list can only answer a list;
* hedge words (`or`, `maybe`, `approx`, ...) and numbers inside `\\text{}` beside other
  content are refused unless the gold has them; juxtaposed numeric atoms likewise;
* only known maths commands (or commands the gold itself uses) are allowed: TeX programming
  (`\\let`, `\\def`, `\\csname`, `\\catcode`, ...) and content-hiding commands (`\\phantom`,
  `\\color`, `\\cancel`) never are; neither are the characters TeX programming needs (`#`,
  `` ` ``, `@`, `^^`);
* the answer's variables must be the gold's (`e` and `i` aside): with a numeric gold, a symbol
  can only cancel out, and symbols are what makes sympy's simplification expensive.

And cheap bounds keep pathological input away from sympy: length (absolute, and relative to
the gold), nesting depth of braces, parentheses and brackets together, towers of powers,
factorial chains, huge number literals, huge exponents (evaluated when numeric), and symbolic
expansions (`(a+b+c+d)^{24}`) too large to simplify.

Every check is a linear scan (regexes without nested quantifiers, no backtracking), so a check
never costs more than reading the answer. The gold's side is computed once per gold (cached).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

# Five times the longest gold in the evaluation sets (210 chars); anything longer is noise.
MAX_ANSWER_CHARS = 1000
# No gold may be longer than the longest answer read (answers are at most MAX_ANSWER_CHARS, so
# a longer gold can never be matched as written); data preparation refuses such a row, naming
# it, so that the gold's own checks stay bounded too (a 50 MB gold kept `grade` busy 10 min).
MAX_GOLD_CHARS = MAX_ANSWER_CHARS
# Honest rewrites of a gold stay close to its length (`\frac12` -> `\dfrac{1}{2}`); a much
# longer answer only buys parse time, which grows with length (measured in a fresh worker: a
# 500-character sum of symbols 1.6 s, 900 characters of `1+1+...` 2.9 s). So an answer may
# be at most twice the gold's length plus 50 characters (54 for `42`, 470 for the longest).
RELATIVE_LENGTH_FACTOR = 2
RELATIVE_LENGTH_SLACK = 50
# Braces, parentheses and brackets together. Golds nest at most 4 deep (3 for braces alone);
# math-verify's parser slows down with depth (0.7 s at 8 braces, 2.7 s at 20 parentheses,
# past 5 s at 40), so the cut-off is well below where cost explodes.
MAX_NESTING_DEPTH = 6
# `a^{b^{c}}` is the most an honest answer needs (`e^{x^2}`, `2^{2^n}`).
MAX_POWER_NESTING = 2
# Longest digit run in a gold is 11; 40 digits is already astronomically precise.
MAX_NUMBER_DIGITS = 40
# `1.2e-3` style exponents: golds go to 37.
MAX_SCIENTIFIC_EXPONENT = 400
# A numeric exponent above this (`10^{10^{10}}`, `9^{9^9}`, `9^{\sqrt{9^{99}}}`) makes sympy
# build a number with billions of digits. Golds go to 1009.
MAX_EXPONENT = 10_000
# `n!`, `\binom{n}{k}`, `\Gamma(n)` with a numeric operand above this: golds go to 100!.
MAX_FACTORIAL_OPERAND = 5_000
# Monomials sympy may have to expand (`(a+b+c+d)^8` has 165 and simplifies in about 1 s; 24
# instead of 8 runs past 5 s). Golds reach 3.
MAX_EXPANSION_TERMS = 200

# --- vocabulary -------------------------------------------------------------------------------

_GREEK = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "varpi",
    "rho",
    "varrho",
    "sigma",
    "varsigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Pi",
    "Sigma",
    "Upsilon",
    "Phi",
    "Psi",
    "Omega",
]
_FUNCTIONS = [
    "sin",
    "cos",
    "tan",
    "sec",
    "csc",
    "cot",
    "arcsin",
    "arccos",
    "arctan",
    "arcsec",
    "arccsc",
    "arccot",
    "sinh",
    "cosh",
    "tanh",
    "coth",
    "sech",
    "csch",
    "log",
    "ln",
    "lg",
    "exp",
    "max",
    "min",
    "gcd",
    "lcm",
    "deg",
    "det",
    "mod",
    "bmod",
    "pmod",
    "arg",
    "Re",
    "Im",
]
# Commands whose braced arguments hold text, not maths: their words are checked for hedges,
# their letters are not variables.
_TEXT_COMMANDS = frozenset(
    [
        "text",
        "textbf",
        "textit",
        "textrm",
        "textnormal",
        "textsf",
        "texttt",
        "textup",
        "textmd",
        "mbox",
        "hbox",
        "operatorname",
    ]
)
_FONT_COMMANDS = [
    "mathrm",
    "mathbf",
    "mathit",
    "mathsf",
    "mathtt",
    "mathcal",
    "mathbb",
    "mathfrak",
    "mathscr",
    "boldsymbol",
    "bm",
    "displaystyle",
    "textstyle",
]
_ACCENTS = [
    "hat",
    "bar",
    "overline",
    "underline",
    "vec",
    "dot",
    "ddot",
    "tilde",
    "widehat",
    "widetilde",
    "overrightarrow",
    "overleftarrow",
    "check",
    "acute",
    "grave",
    "breve",
]
_DELIMITERS = [
    "left",
    "right",
    "big",
    "Big",
    "bigg",
    "Bigg",
    "bigl",
    "bigr",
    "Bigl",
    "Bigr",
    "biggl",
    "biggr",
    "Biggl",
    "Biggr",
    "middle",
    "lfloor",
    "rfloor",
    "lceil",
    "rceil",
    "langle",
    "rangle",
    "vert",
    "Vert",
    "lvert",
    "rvert",
    "lVert",
    "rVert",
]
_SPACING = frozenset(
    [",", ";", ":", "!", ">", "quad", "qquad", "enspace", "thinspace", "medspace", "thickspace"]
    + [" "]
)
_STRUCTURE = [
    "frac",
    "dfrac",
    "tfrac",
    "cfrac",
    "sqrt",
    "binom",
    "dbinom",
    "tbinom",
    "choose",
    "begin",
    "end",
]
_SYMBOLS = [
    "cdot",
    "times",
    "div",
    "ast",
    "star",
    "infty",
    "circ",
    "degree",
    "prime",
    "emptyset",
    "varnothing",
    "hbar",
    "ell",
    "partial",
    "nabla",
    "imath",
    "jmath",
    "aleph",
    "%",
    "$",
    "{",
    "}",
    "|",
    "_",
]
# Relations (allowed, but counted and compared with the gold's).
_RELATION_COMMANDS = {
    **dict.fromkeys(["le", "leq", "leqslant", "leqq", "lt"], "<"),
    **dict.fromkeys(["ge", "geq", "geqslant", "geqq", "gt"], ">"),
    **dict.fromkeys(["ne", "neq"], "!="),
    **dict.fromkeys(
        ["approx", "approxeq", "sim", "simeq", "cong", "equiv", "propto", "doteq", "asymp"], "~"
    ),
    **dict.fromkeys(["ll", "gg", "lesssim", "gtrsim", "prec", "succ", "preceq", "succeq"], "<<"),
    **dict.fromkeys(
        [
            "to",
            "rightarrow",
            "leftarrow",
            "Rightarrow",
            "Leftarrow",
            "leftrightarrow",
            "Leftrightarrow",
            "implies",
            "impliedby",
            "iff",
            "mapsto",
            "longrightarrow",
            "Longrightarrow",
        ],
        "->",
    ),
    **dict.fromkeys(
        ["in", "notin", "ni", "subset", "subseteq", "supset", "supseteq", "subsetneq"], "in"
    ),
}
# Separators between alternatives (allowed, but no more of them than in the gold).
_SEPARATOR_COMMANDS = {
    **dict.fromkeys(["pm", "mp"], "pm"),
    **dict.fromkeys(["lor", "vee", "land", "wedge"], "or"),
    **dict.fromkeys(["cup", "cap", "setminus"], "cup"),
    **dict.fromkeys(["ldots", "cdots", "dots", "dotsc", "dotsb", "vdots", "ddots"], "dots"),
    "\\": "row",
}
_SEPARATOR_CHARS = {",": ",", ";": ";", "&": "&", ":": ":", "$": "$"}
_RELATION_CHARS = {"=": "=", "<": "<", ">": ">"}
_UNICODE = {
    **dict.fromkeys("≤≦⩽", ("rel", "<")),
    **dict.fromkeys("≥≧⩾", ("rel", ">")),
    **dict.fromkeys("≠", ("rel", "!=")),
    **dict.fromkeys("≈≃≅≡∼∝", ("rel", "~")),
    **dict.fromkeys("→⇒⇔↔⟹⟺", ("rel", "->")),
    **dict.fromkeys("∈∉⊂⊆⊃⊇", ("rel", "in")),
    **dict.fromkeys("±∓", ("sep", "pm")),
    **dict.fromkeys("∨∧", ("sep", "or")),
    **dict.fromkeys("∪∩", ("sep", "cup")),
    **dict.fromkeys("…⋯", ("sep", "dots")),
}
# Non-ASCII characters an honest answer may contain (degrees, pi, minus, times, roots).
_HARMLESS_UNICODE = frozenset("°π−×·√∞θ")
_ENVIRONMENTS = frozenset(
    ["pmatrix", "bmatrix", "matrix", "vmatrix", "Vmatrix", "Bmatrix", "smallmatrix", "array"]
)

_ALLOWED_COMMANDS = frozenset(
    _GREEK
    + _FUNCTIONS
    + list(_TEXT_COMMANDS)
    + _FONT_COMMANDS
    + _ACCENTS
    + _DELIMITERS
    + list(_SPACING)
    + _STRUCTURE
    + _SYMBOLS
    + list(_RELATION_COMMANDS)
    + list(_SEPARATOR_COMMANDS)
)
# Never allowed, even in a gold: TeX programming, input, and commands that hide or strike
# content from the reader (but not from math-verify's normaliser, or the other way round).
TEX_PROGRAMMING = frozenset(
    [
        "let",
        "def",
        "edef",
        "gdef",
        "xdef",
        "futurelet",
        "csname",
        "endcsname",
        "catcode",
        "lccode",
        "uccode",
        "mathcode",
        "newcommand",
        "renewcommand",
        "providecommand",
        "DeclareMathOperator",
        "DeclareRobustCommand",
        "newenvironment",
        "renewenvironment",
        "expandafter",
        "noexpand",
        "unexpanded",
        "detokenize",
        "scantokens",
        "input",
        "include",
        "includeonly",
        "usepackage",
        "RequirePackage",
        "documentclass",
        "makeatletter",
        "makeatother",
        "write",
        "read",
        "openin",
        "openout",
        "immediate",
        "special",
        "string",
        "meaning",
        "the",
        "relax",
        "begingroup",
        "endgroup",
        "bgroup",
        "egroup",
        "global",
        "long",
        "outer",
        "protected",
        "afterassignment",
        "aftergroup",
        "uppercase",
        "lowercase",
        "romannumeral",
        "number",
        "numexpr",
        "dimexpr",
        "char",
        "mathchar",
        "chardef",
        "mathchardef",
        "countdef",
        "count",
        "dimen",
        "skip",
        "toks",
        "advance",
        "multiply",
        "divide",
        "setcounter",
        "setlength",
        "newcounter",
        "ifx",
        "ifnum",
        "ifdim",
        "ifcase",
        "iftrue",
        "iffalse",
        "else",
        "fi",
        "or",
        "loop",
        "repeat",
        "directlua",
        "pdfprimitive",
        "phantom",
        "hphantom",
        "vphantom",
        "smash",
        "color",
        "textcolor",
        "colorbox",
        "cancel",
        "bcancel",
        "xcancel",
        "sout",
        "xout",
        "not",
        "hspace",
        "vspace",
        "kern",
        "hskip",
        "vskip",
        "raise",
        "lower",
        "llap",
        "rlap",
        "clap",
        "mathllap",
        "mathrlap",
        "mathclap",
        "label",
        "tag",
        "notag",
        "nonumber",
        "ref",
        "eqref",
        "footnote",
        "href",
        "url",
        "verb",
        "boxed",
        "fbox",
        "framebox",
        "tiny",
        "scriptsize",
        "small",
        "normalsize",
        "large",
        "Large",
        "huge",
        "Huge",
        "scriptscriptstyle",
        "scriptstyle",
        "limits",
        "nolimits",
        "mathop",
        "mathbin",
        "mathrel",
        "mathord",
        "mathpunct",
        "lim",
        "sum",
        "prod",
        "int",
        "iint",
        "iiint",
        "oint",
        "liminf",
        "limsup",
        "sup",
        "inf",
    ]
)

# Words that turn an answer into several answers or a hedge ("42 or 43", "about 42").
HEDGE_WORDS = frozenset(
    [
        "or",
        "and",
        "nor",
        "not",
        "maybe",
        "perhaps",
        "possibly",
        "probably",
        "either",
        "neither",
        "otherwise",
        "else",
        "alternatively",
        "also",
        "approx",
        "approximately",
        "about",
        "around",
        "roughly",
        "nearly",
        "almost",
        "circa",
        "ca",
        "vs",
        "versus",
        "between",
        "to",
        "than",
        "least",
        "most",
        "unless",
        "if",
        "then",
        "except",
        "but",
        "plus",
        "minus",
        "instead",
        "guess",
        "likely",
        "unsure",
        "unknown",
        "undefined",
        "none",
        "all",
        "any",
        "some",
        "etc",
    ]
)

# --- tokenising (one linear regex) -------------------------------------------------------------

_TOKEN = re.compile(
    r"\\([A-Za-z]+)\*?"  # 1: command
    r"|\\(.)"  # 2: escaped character (`\{`, `\,`, `\\`)
    r"|(\d+(?:\.\d*)?|\.\d+)"  # 3: number
    r"|([A-Za-z])"  # 4: letter
    r"|(\s+)"  # 5: space
    r"|(.)",  # 6: any other character
    re.DOTALL,
)
# Thousands separators are part of a number, not a list: `58,500`, `10,\!080`, `1{,}000`.
_THOUSANDS = re.compile(r"(?<=\d)(?:,\\!\s*|\{,\}|,)(?=\d{3}(?!\d))")
# Linear: a number starts only where no digit, point, letter or backslash precedes it, and its
# quantifiers are possessive, so a run of n digits is read once. The former `(\d*\.?\d+)[eE]`
# tried every split of every suffix of the run: cubic, 4 s for 1,000 digits.
_SCIENTIFIC = re.compile(r"(?<![A-Za-z\\\d.])(\d++(?:\.\d++)?|\.\d++)[eE]([+-]?+\d++)")
# TeX programming needs `#` (macro parameters), `` ` `` (character codes), `@` (internal
# names), `^^` (character escapes); `?` and `"` are hedges or quotes; an unescaped `%` that is
# not at the end starts a TeX comment that hides the rest (golds end with `%`, as in `17.5%`);
# `**` is no LaTeX, only a way to write towers the `^` checks would not see.
_FORBIDDEN_CHARS = re.compile(r"[#`@\"?\x00-\x08\x0b-\x1f\x7f]|\^\^|\*\s*\*|(?<!\\)%(?=\s*\S)")
_VARIABLE = r"(?:[A-Za-z]|\\(?:" + "|".join(g for g in _GREEK if g != "pi") + r"))"
_ASSIGNMENT = re.compile(
    rf"\s*{_VARIABLE}(?:_(?:[A-Za-z0-9]|\{{[A-Za-z0-9]+\}}))?'*\s*(?:=|\\in(?![A-Za-z]))(.*)",
    re.DOTALL,
)
_NOT_A_VARIABLE = frozenset("ei")  # Euler's number and the imaginary unit

# Commands taking braced arguments: how many (their `}` ... `{` is not juxtaposition).
_ARGUMENTS = {
    **dict.fromkeys(["frac", "dfrac", "tfrac", "cfrac", "binom", "dbinom", "tbinom"], 2),
    **dict.fromkeys(list(_TEXT_COMMANDS) + _FONT_COMMANDS + _ACCENTS + ["sqrt"], 1),
    **dict.fromkeys(["begin", "end"], 1),
}
_TRANSPARENT = frozenset(_SPACING) | frozenset(_DELIMITERS[:14])  # \left, \right, \big...


@dataclass(frozen=True)
class _Token:
    kind: str  # "cmd", "esc", "num", "letter", "char"
    text: str
    spaced: bool  # whitespace came right before it


class _TokenList(list):
    """Tokens, with every bracket's partner found once (one stack pass), so that looking up an
    operand costs its own length, not a scan to the end: with `)))...(((` each lookup used to
    read the rest of the answer, quadratic in its length."""

    closing: dict[int, int]  # open bracket -> its closing bracket (the last index if none)
    opening: dict[int, int]  # close bracket -> its opening bracket (0 if none)

    def pair_brackets(self) -> None:
        self.closing, self.opening, open_at = {}, {}, []
        for index, token in enumerate(self):
            side = _bracket(token)
            if side == "open":
                open_at.append(index)
            elif side == "close":
                if open_at:
                    self.closing[open_at[-1]] = index
                    self.opening[index] = open_at.pop()
                else:
                    self.opening[index] = 0
        for index in open_at:
            self.closing[index] = len(self) - 1


def _tokens(text: str) -> _TokenList:
    tokens = _TokenList()
    spaced = False
    for match in _TOKEN.finditer(text):
        command, escaped, number, letter, space, char = match.groups()
        if space is not None:
            spaced = True
            continue
        if command is not None:
            tokens.append(_Token("cmd", command, spaced))
        elif escaped is not None:
            tokens.append(_Token("esc", escaped, spaced))
        elif number is not None:
            tokens.append(_Token("num", number, spaced))
        elif letter is not None:
            tokens.append(_Token("letter", letter, spaced))
        else:
            tokens.append(_Token("char", char, spaced))
        spaced = False
    tokens.pair_brackets()
    return tokens


def _is_transparent(token: _Token) -> bool:
    return (token.kind in ("cmd", "esc") and token.text in _TRANSPARENT) or (
        token.kind == "char" and token.text == "~"
    )


# --- structure -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Profile:
    """What an expression is made of, as far as gaming and cost are concerned."""

    commands: frozenset[str]
    environments: frozenset[str]
    relations: tuple[str, ...]  # sorted
    separators: Counter
    words: frozenset[str]  # lower-case letter runs of two or more, anywhere
    letters: frozenset[str]  # variables: maths letters outside text commands
    juxtaposed: bool  # two numeric atoms side by side
    text_with_digits: bool  # a \text{} holding digits beside other content
    balanced: bool  # ( and [ against ) and ], \{ against \}
    depth: int  # braces, parentheses and brackets together
    problem: str | None  # a cost problem found while scanning (tower, huge number, ...)


def _strip_dollars(gold: str) -> str:
    return gold.strip().strip("$").strip()


def _normalise(text: str) -> str:
    return _THOUSANDS.sub("", text)


def _bracket(token: _Token) -> str | None:
    """ "open", "close" or None: parentheses, brackets, braces and escaped braces alike."""
    if token.kind == "char" and token.text in "({[":
        return "open"
    if token.kind == "char" and token.text in ")}]":
        return "close"
    if token.kind == "esc" and token.text in "{}":
        return "open" if token.text == "{" else "close"
    return None


def _profile(text: str) -> _Profile:
    # `1.2e-3` is a number, not the variable e: written out so that exponents see it too
    # (`10^{1e9}` is a tower).
    text = _normalise(text)
    huge_scientific = any(
        abs(int(match.group(2))) > MAX_SCIENTIFIC_EXPONENT for match in _SCIENTIFIC.finditer(text)
    )
    text = _SCIENTIFIC.sub(r"(\1\\cdot 10^{\2})", text)
    tokens = _tokens(text)
    commands: set[str] = set()
    environments: set[str] = set()
    relations: list[str] = []
    separators: Counter = Counter()
    words: set[str] = set()
    letters: set[str] = set()
    text_digits = 0
    # Brace roles, so that `\frac{1}{2}` is not read as the juxtaposition `{1}{2}`.
    stack: list[tuple[str, int]] = []  # (role, arguments still pending after this group)
    pending = 0
    text_depth = 0  # inside the argument of \text{} and the like
    depth = max_depth = 0
    bracket_balance = set_braces = 0
    balanced = True
    atom_end: int | None = None  # index of the token ending the previous atom, if any
    candidates: list[tuple[int, int]] = []  # (end of one atom, start of the next)
    previous: _Token | None = None
    word = ""

    def end_word() -> None:
        nonlocal word
        if len(word) >= 2:
            words.add(word.lower())
        word = ""

    for index, token in enumerate(tokens):
        if token.kind != "letter" or token.spaced:
            end_word()
        if _is_transparent(token):
            if token.kind == "cmd":
                commands.add(token.text)
            continue  # spacing and \left, \right: an atom still ends where it ended
        starts_atom = ends_atom = keep_pending = closed_text = False
        kind, value = token.kind, token.text
        if kind == "cmd":
            commands.add(value)
            if value in _RELATION_COMMANDS:
                relations.append(_RELATION_COMMANDS[value])
            elif value in _SEPARATOR_COMMANDS:
                separators[_SEPARATOR_COMMANDS[value]] += 1
            if value in ("begin", "end"):
                environments.add(_environment_name(tokens, index + 1))
        elif kind == "esc":
            commands.add(value)
            if value == "{":
                set_braces += 1
                depth += 1
                starts_atom = True
            elif value == "}":
                set_braces -= 1
                depth -= 1
                balanced = balanced and set_braces >= 0
                ends_atom = True
            elif value in _SEPARATOR_COMMANDS:
                separators[_SEPARATOR_COMMANDS[value]] += 1
        elif kind == "num":
            starts_atom = ends_atom = True
            if text_depth:
                text_digits += 1
        elif kind == "letter":
            word = (
                word + value
                if previous is not None and previous.kind == "letter" and not token.spaced
                else value
            )
            if not text_depth:
                letters.add(value)
        elif value == "{":
            is_text = False
            if previous is not None and previous.kind == "char" and previous.text in "^_":
                role = "script"
            elif pending > 0:
                role = "argument"
                # Text arguments, and environment names (`\\begin{bmatrix}`), hold words
                # rather than variables.
                is_text = (
                    previous is not None
                    and previous.kind == "cmd"
                    and (previous.text in _TEXT_COMMANDS or previous.text in ("begin", "end"))
                )
            else:
                role = "bare"
                starts_atom = True
            stack.append(("text" if is_text else role, pending - 1 if role == "argument" else 0))
            pending, keep_pending = 0, True
            text_depth += is_text
            depth += 1
        elif value == "}":
            depth -= 1
            if stack:
                role, pending = stack.pop()
                keep_pending = True
                closed_text = role == "text"
                text_depth -= closed_text
                ends_atom = pending == 0
            else:
                balanced = False
        elif (
            value == "["
            and previous is not None
            and previous.kind == "cmd"
            and previous.text == "sqrt"
        ):
            stack.append(("optional", 1))  # `\sqrt[3]{x}`: the index, then the radicand
            pending, keep_pending = 0, True
            depth += 1
        elif value in "([":
            bracket_balance += 1
            depth += 1
            starts_atom = True
        elif value == "]" and stack and stack[-1][0] == "optional":
            _, pending = stack.pop()
            keep_pending = True
            depth -= 1
        elif value in ")]":
            bracket_balance -= 1
            depth -= 1
            balanced = balanced and bracket_balance >= 0
            ends_atom = True
        elif value in _RELATION_CHARS:
            relations.append(_RELATION_CHARS[value])
        elif value in _SEPARATOR_CHARS:
            separators[_SEPARATOR_CHARS[value]] += 1
        elif value in _UNICODE:
            group, name = _UNICODE[value]
            if group == "rel":
                relations.append(name)
            else:
                separators[name] += 1
        if kind == "cmd":
            pending = _ARGUMENTS.get(value, 0)
        elif not keep_pending:
            pending = 0
        max_depth = max(max_depth, depth)
        previous = token
        if text_depth or closed_text or (kind == "cmd" and value in _TEXT_COMMANDS):
            continue  # text is transparent: `20 \text{ apples } 22` still juxtaposes numbers
        if starts_atom and atom_end is not None:
            candidates.append((atom_end, index))
        atom_end = index if ends_atom else None
    end_word()
    balanced = balanced and bracket_balance == 0 and set_braces == 0
    # A text command that is the whole answer (`\text{42}`) is that answer, not a hedge.
    if (
        len(tokens) >= 3
        and tokens[0].kind == "cmd"
        and tokens[0].text in _TEXT_COMMANDS
        and _matching(tokens, 1) == len(tokens) - 1
    ):
        text_digits = 0
    return _Profile(
        commands=frozenset(commands),
        environments=frozenset(environments),
        relations=tuple(sorted(relations)),
        separators=separators,
        words=frozenset(words),
        letters=frozenset(letters),
        juxtaposed=any(_numeric_pair(tokens, end, start) for end, start in candidates),
        text_with_digits=text_digits > 0,
        balanced=balanced,
        depth=max_depth,
        problem="huge exponent" if huge_scientific else _cost_problem(tokens),
    )


def _environment_name(tokens: list[_Token], start: int) -> str:
    """`pmatrix` from the tokens of `{pmatrix}` starting at `start`."""
    if start >= len(tokens) or tokens[start].text != "{":
        return ""
    name = []
    for token in tokens[start + 1 : start + 30]:
        if token.kind != "letter":
            break
        name.append(token.text)
    return "".join(name)


def _numeric_pair(tokens: list[_Token], end: int, start: int) -> bool:
    """Whether the atoms ending at `end` and starting at `start` hold no variables: math-verify
    reads such a pair as a mixed number and ADDS them (`20 22`, `(20)(22)`, `2(40)` are 42)."""
    left = _operand_before(tokens, end + 1)
    right, _ = _operand_after(tokens, start)
    return not any(t.kind == "letter" for t in left + right)


# --- cost: numbers, powers, factorials, expansions ------------------------------------------


class _NotNumeric(Exception):
    pass


class _Evaluator:
    """Evaluates a purely numeric LaTeX fragment to a float (inf when it overflows), or raises
    _NotNumeric. Used only on exponents and factorial operands, to bound what sympy would
    compute; never to decide correctness."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = [t for t in tokens if not _is_transparent(t)]
        self.position = 0

    def evaluate(self) -> float:
        value = self._sum()
        if self.position != len(self.tokens):
            raise _NotNumeric
        return value

    def _peek(self) -> _Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _is(self, kind: str, *texts: str) -> bool:
        token = self._peek()
        return token is not None and token.kind == kind and (not texts or token.text in texts)

    def _take(self) -> _Token:
        token = self._peek()
        if token is None:
            raise _NotNumeric
        self.position += 1
        return token

    def _sum(self) -> float:
        sign = 1.0
        while self._is("char", "+", "-"):
            sign *= -1.0 if self._take().text == "-" else 1.0
        value = sign * self._product()
        while self._is("char", "+", "-"):
            sign = -1.0 if self._take().text == "-" else 1.0
            value = _arithmetic("+", value, sign * self._product())
        return value

    def _product(self) -> float:
        value = self._power()
        while True:
            if self._is("char", "*", "/") or self._is("cmd", "cdot", "times", "div"):
                operator = "/" if self._take().text in ("/", "div") else "*"
                value = _arithmetic(operator, value, self._power())
            elif self._starts_atom():
                value = _arithmetic("*", value, self._power())
            else:
                return value

    def _starts_atom(self) -> bool:
        token = self._peek()
        if token is None:
            return False
        return (
            token.kind == "num"
            or (token.kind == "char" and token.text in "({[")
            or (token.kind == "cmd" and token.text in ("frac", "dfrac", "tfrac", "sqrt", "pi"))
            or (token.kind == "letter" and token.text == "e")
        )

    def _power(self) -> float:
        base = self._factorial(self._atom())
        if self._is("char", "^"):
            self._take()
            exponent = self._factorial(self._atom())
            if abs(exponent) > MAX_EXPONENT * 1e3:
                return math.inf
            return _arithmetic("^", base, exponent)
        return base

    def _factorial(self, value: float) -> float:
        while self._is("char", "!"):
            self._take()
            value = _arithmetic("!", value, 0.0)
        return value

    def _atom(self) -> float:
        token = self._take()
        if token.kind == "num":
            return float(token.text)
        if token.kind == "letter" and token.text == "e":
            return math.e
        if token.kind == "char" and token.text in "({[":
            closing = {"(": ")", "{": "}", "[": "]"}[token.text]
            value = self._sum()
            if not self._is("char", closing):
                raise _NotNumeric
            self._take()
            return value
        if token.kind == "char" and token.text == "-":
            return -self._atom()
        if token.kind == "cmd":
            if token.text == "pi":
                return math.pi
            if token.text in ("frac", "dfrac", "tfrac"):
                numerator = self._atom()
                return _arithmetic("/", numerator, self._atom())
            if token.text == "sqrt":
                index = 2.0
                if self._is("char", "["):
                    self._take()
                    index = self._sum()
                    if not self._is("char", "]"):
                        raise _NotNumeric
                    self._take()
                return _arithmetic("root", self._atom(), index)
        raise _NotNumeric


def _arithmetic(operator: str, a: float, b: float) -> float:
    """`a operator b` in floats, inf where it overflows or is undefined: only magnitudes matter."""
    try:
        if operator == "+":
            value = a + b
        elif operator == "*":
            value = a * b
        elif operator == "/":
            value = a / b if b else math.inf
        elif operator == "^":
            value = math.copysign(abs(a) ** b, a)
        elif operator == "!":
            value = math.exp(math.lgamma(abs(a) + 1)) if abs(a) < 200 else math.inf
        else:  # "root": the b-th root of a
            value = abs(a) ** (1 / b) if b else math.inf
    except (OverflowError, ZeroDivisionError, ValueError):
        return math.inf
    return float(value)


def _numeric_value(tokens: list[_Token]) -> float | None:
    if not tokens:
        return None
    try:
        return _Evaluator(tokens).evaluate()
    except (_NotNumeric, RecursionError):
        return None


def _operand_after(tokens: list[_Token], start: int) -> tuple[list[_Token], int]:
    """The operand that starts at `start` (a braced group, a command with its braced arguments,
    or one token), and the index after it."""
    index = start
    while index < len(tokens) and _is_transparent(tokens[index]):
        index += 1
    if index >= len(tokens):
        return [], index
    first = tokens[index]
    if _bracket(first) == "open":
        end = _matching(tokens, index)
        return tokens[index : end + 1], end + 1
    if first.kind == "cmd" and first.text in _ARGUMENTS:
        end = index + 1
        if first.text == "sqrt" and end < len(tokens) and tokens[end].text == "[":
            end = _matching(tokens, end) + 1
        for _ in range(_ARGUMENTS[first.text]):
            if end < len(tokens) and tokens[end].kind == "char" and tokens[end].text == "{":
                end = _matching(tokens, end) + 1
        return tokens[index:end], end
    return [first], index + 1


def _matching(tokens: list[_Token], start: int) -> int:
    """Index of the bracket closing the one at `start` (any of ({[ against any of )}]), or the
    last index when it never closes."""
    if isinstance(tokens, _TokenList) and start in tokens.closing:
        return tokens.closing[start]
    end = _balanced_at(tokens, range(start, len(tokens)), "open")
    return len(tokens) - 1 if end is None else end


def _balanced_at(tokens: list[_Token], indices: range, deeper: str) -> int | None:
    """The first of `indices` at which the brackets read so far balance again (a bracket of side
    `deeper` goes one level in, the other side one out), or None if they never do."""
    depth = 0
    for index in indices:
        side = _bracket(tokens[index])
        if side == deeper:
            depth += 1
        elif side is not None:
            depth -= 1
            if depth == 0:
                return index
    return None


def _operand_before(tokens: list[_Token], end: int) -> list[_Token]:
    """The operand that ends just before `end` (a number or a bracketed group)."""
    index = end - 1
    while index >= 0 and _is_transparent(tokens[index]):
        index -= 1
    if index < 0:
        return []
    last = tokens[index]
    if _bracket(last) == "close":
        if isinstance(tokens, _TokenList):
            return tokens[tokens.opening[index] : index + 1]
        start = _balanced_at(tokens, range(index, -1, -1), "close")
        return tokens[: index + 1] if start is None else tokens[start : index + 1]
    return [last]


def _monomials(base: list[_Token], exponent: float | None) -> int:
    """How many monomials expanding `base^exponent` can make (1 when there is nothing to expand)."""
    if not any(t.kind == "letter" for t in base):
        return 1
    terms = 1 + sum(1 for t in base[1:-1] if t.kind == "char" and t.text in "+-")
    if terms == 1 or exponent is None or exponent != int(exponent) or exponent < 2:
        return terms
    exponent = int(min(exponent, 10**6))
    if terms - 1 > 50:
        return 10**9
    return min(math.comb(exponent + terms - 1, terms - 1), 10**9)


def _cost_problem(tokens: list[_Token]) -> str | None:
    """Why sympy could spend seconds on this expression, or None."""
    expansion = _group_products(tokens)
    if expansion > MAX_EXPANSION_TERMS:
        return "expansion too large"
    power_level = [0]  # power nesting of each open brace group
    script_open: list[bool] = []
    chain_pending = False  # a `^` operand just ended: another `^` would make a chain
    for index, token in enumerate(tokens):
        if token.kind == "num":
            digits = sum(ch.isdigit() for ch in token.text)
            if digits > MAX_NUMBER_DIGITS:
                return "huge number"
        if token.kind == "char" and token.text == "!":
            following = index + 1 < len(tokens) and tokens[index + 1]
            if following and following.kind == "char" and following.text == "!":
                return "factorial chain"
            operand = _operand_before(tokens, index)
            if any(t.kind == "char" and t.text == "!" for t in operand):
                return "factorial chain"
            value = _numeric_value(operand)
            if value is not None and abs(value) > MAX_FACTORIAL_OPERAND:
                return "huge factorial"
        if token.kind == "cmd" and token.text in ("binom", "dbinom", "tbinom", "Gamma", "choose"):
            operand, after = _operand_after(tokens, index + 1)
            values = [
                _numeric_value(
                    operand[1:-1] if operand[:1] and operand[0].text in "({" else operand
                )
            ]
            if token.text in ("binom", "dbinom", "tbinom"):
                second, _ = _operand_after(tokens, after)
                values.append(
                    _numeric_value(second[1:-1] if second[:1] and second[0].text == "{" else second)
                )
            if any(v is not None and abs(v) > MAX_FACTORIAL_OPERAND for v in values):
                return "huge factorial"
        is_power = token.kind == "char" and token.text == "^"
        if token.kind == "char" and token.text == "*" and index + 1 < len(tokens):
            following = tokens[index + 1]
            is_power = following.kind == "char" and following.text == "*" and not following.spaced
        if not is_power:
            if token.kind == "char" and token.text == "{":
                is_script = (
                    index > 0 and tokens[index - 1].kind == "char" and tokens[index - 1].text == "^"
                )
                power_level.append(power_level[-1] + (1 if is_script else 0))
                script_open.append(is_script)
            elif token.kind == "char" and token.text == "}" and len(power_level) > 1:
                power_level.pop()
                script_open.pop()
            if chain_pending and not (token.kind == "char" and token.text in "}"):
                chain_pending = False
            continue
        if chain_pending:
            return "power tower"  # `a^b^c`: a double superscript, read as a tower
        exponent_tokens, after = _operand_after(tokens, index + 1)
        level = power_level[-1] + 1
        inner = (
            exponent_tokens[1:-1]
            if exponent_tokens[:1] and exponent_tokens[0].text == "{"
            else exponent_tokens
        )
        level += _power_nesting(inner)
        if level > MAX_POWER_NESTING:
            return "power tower"
        exponent = _numeric_value(inner)
        if exponent is not None and (math.isinf(exponent) or abs(exponent) > MAX_EXPONENT):
            return "huge exponent"
        expansion *= _monomials(_operand_before(tokens, index), exponent)
        if expansion > MAX_EXPANSION_TERMS:
            return "expansion too large"
        # `9^9^9`: the exponent's operand is followed by another `^`.
        if after < len(tokens) and tokens[after].kind == "char" and tokens[after].text == "^":
            return "power tower"
    return None


def _group_products(tokens: list[_Token]) -> int:
    """Monomials from multiplying out the parenthesised sums with variables that are not raised
    to a power (`(a+b)(c+d)(e+f)` has 8); powers are counted where they are read."""
    product = 1
    for index, token in enumerate(tokens):
        if not (token.kind == "char" and token.text == "("):
            continue
        end = _matching(tokens, index)
        after = end + 1
        while after < len(tokens) and _is_transparent(tokens[after]):
            after += 1
        if after < len(tokens) and tokens[after].kind == "char" and tokens[after].text == "^":
            continue
        product = min(product * _monomials(tokens[index : end + 1], 1), 10**9)
        if product > MAX_EXPANSION_TERMS:
            break  # refused anyway; reading on would only cost time
    return product


def _power_nesting(tokens: list[_Token]) -> int:
    """How deep `^` nests inside an exponent (0 when it has none)."""
    deepest = 0
    levels = [0]
    for index, token in enumerate(tokens):
        if token.kind != "char":
            continue
        if token.text == "^" or (
            token.text == "*" and index + 1 < len(tokens) and tokens[index + 1].text == "*"
        ):
            deepest = max(deepest, levels[-1] + 1)
        elif token.text == "{":
            is_script = index > 0 and tokens[index - 1].text == "^"
            levels.append(levels[-1] + (1 if is_script else 0))
        elif token.text == "}" and len(levels) > 1:
            levels.pop()
    return deepest


# --- the decision ------------------------------------------------------------------------------


def _core(text: str) -> tuple[str, bool]:
    """`x = 42` -> (`42`, True): the value assigned to a single variable; else (text, False)."""
    match = _ASSIGNMENT.fullmatch(text)
    if match is None:
        return text, False
    return match.group(1), True


@dataclass(frozen=True)
class _Gold:
    whole: _Profile
    core: _Profile  # of the assigned value when the gold is an assignment (`x = 5`)
    is_assignment: bool
    length: int


@lru_cache(maxsize=8192)
def _gold(gold: str) -> _Gold:
    stripped = _strip_dollars(gold)
    core_text, is_assignment = _core(stripped)
    whole = _profile(stripped)
    return _Gold(
        whole=whole,
        core=_profile(core_text) if is_assignment else whole,
        is_assignment=is_assignment,
        length=len(stripped),
    )


def _character_problem(text: str, gold: str) -> str | None:
    if _FORBIDDEN_CHARS.search(text):
        return "forbidden character"
    if text.rstrip().endswith("\\") and not text.rstrip().endswith("\\\\"):
        return "forbidden character"
    for char in text:
        known = char in _HARMLESS_UNICODE or char in _UNICODE or char in gold
        if ord(char) > 127 and not known:
            return "forbidden character"
    return None


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth = max(0, depth - 1)  # a stray close must not hide the opens after it
    return deepest


def rejection(predicted: str, gold: str) -> str | None:
    """Why the boxed answer `predicted` cannot be graded correct against `gold` (a short
    reason), or None when it is left to math-verify. Linear in the answer's length."""
    text = _strip_dollars(predicted)  # as the gold's: `$...$` wraps, it does not separate
    golden = _gold(gold)
    # Cheapest first: length and nesting bound everything that follows.
    if len(text) > MAX_ANSWER_CHARS:
        return "too long"
    if len(text) > RELATIVE_LENGTH_FACTOR * golden.length + RELATIVE_LENGTH_SLACK:
        return "too long for the gold"
    if _nesting_depth(text) > max(MAX_NESTING_DEPTH, golden.whole.depth):
        return "nested too deep"
    if (problem := _character_problem(text, gold)) is not None:
        return problem

    whole = _profile(text)
    if whole.problem is not None:
        return whole.problem
    commands = whole.commands
    if commands & TEX_PROGRAMMING:
        return "TeX programming"
    unknown = commands - _ALLOWED_COMMANDS - golden.whole.commands
    if unknown:
        return "unknown command"
    if whole.environments - _ENVIRONMENTS - golden.whole.environments:
        return "unknown environment"
    if (whole.words & HEDGE_WORDS) - golden.whole.words:
        return "hedge word"

    # Assignments: `x = 42` answers `42`, and `42` answers `x = 42`. Then compare the values.
    core_text, is_assignment = _core(text)
    core = _profile(core_text) if is_assignment else whole
    gold_core = golden.core  # the gold's value when it is an assignment, else the gold

    # A gold with one relation (`f(x) = x + 1`) may be answered by its value alone.
    value_of_relation = (
        not core.relations
        and len(gold_core.relations) == 1
        and gold_core.relations[0] in ("=", "in")
    )
    if core.relations != gold_core.relations and not value_of_relation:
        return "relation"
    for separator, count in core.separators.items():
        allowed = gold_core.separators[separator]
        if separator == ",":
            allowed += gold_core.separators["pm"]  # `\{1 \pm \sqrt5, -2\}` -> three values
        if count > allowed:
            return "alternatives"
    if core.juxtaposed and not golden.whole.juxtaposed:
        return "juxtaposed numbers"
    if core.text_with_digits and not golden.whole.text_with_digits:
        return "numbers in text"
    if golden.whole.balanced and not core.balanced:
        return "unbalanced brackets"
    if core.letters - golden.whole.letters - _NOT_A_VARIABLE:
        return "unknown variable"
    return None
