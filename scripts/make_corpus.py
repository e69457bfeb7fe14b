"""Synthetic blank-infilling corpus for the embedded default GLM model (no downloads).

Every sentence is checkable by a reader: facts from the small tables below (countries and capitals,
chemical elements, planets, opposites, colours) and two-digit arithmetic
("27 plus 15 equals 42"), in English and Chinese. `build_corpus(seed)` is pure and deterministic
(only `random.Random(seed)` and sorted containers, no hash order), so the training script, the demo
and the tests all regenerate exactly the same split without shipping data files.

Relations whose held-out template is ambiguous about direction are left out: an earlier version had
"the day after X" / "the month after X"; with only 7 and 12 facts the model could not learn which way
an unseen template such as "X过后就是[MASK]" points, and those two relations alone cost 11 points of
held-out fact accuracy.

Split (what "held out" means):
- Facts. Each relation has 3-4 sentence templates per language and one or two blankable slots
  (e.g. country and capital). For every fact and language, ONE template is held out: that
  (fact, template) sentence never appears in training in any form (no blank of it, no span of it,
  not inside an [sMASK] paragraph). The fact itself is trained through the other templates, with
  every slot blanked there. A held-out item asks for a slot in the held-out template, so the model
  must carry a fact it learnt in other phrasings into a new phrasing (it cannot know unseen facts).
- Arithmetic. Addition triples (a, b, a + b) with 0 <= a, b <= 99. A random `heldout_fraction` of
  the unordered operand pairs {a, b} is held out: no sentence of such a triple ("a plus b",
  "b plus a", "c minus a", "c minus b", English or Chinese) is in training. Held-out items ask for
  the sum of a held-out pair and for the difference c - b of a held-out triple.

Usage: python scripts/make_corpus.py --out build/default_model/corpus [--seed 0]
writes train.jsonl (one sentence record per line), heldout.jsonl (prompt/answer items),
sentences.txt (training text for SentencePiece) and stats.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

MASK = "[MASK]"

# ---------------------------------------------------------------------------------------------
# Fact tables: (english X, english Y, chinese X, chinese Y)
# ---------------------------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Chile", "Santiago", "智利", "圣地亚哥"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("India", "New Delhi", "印度", "新德里"),
    ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Vietnam", "Hanoi", "越南", "河内"),
    ("Greece", "Athens", "希腊", "雅典"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Poland", "Warsaw", "波兰", "华沙"),
    ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Denmark", "Copenhagen", "丹麦", "哥本哈根"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Bulgaria", "Sofia", "保加利亚", "索非亚"),
    ("Belgium", "Brussels", "比利时", "布鲁塞尔"),
    ("Hungary", "Budapest", "匈牙利", "布达佩斯"),
    ("Cuba", "Havana", "古巴", "哈瓦那"),
    ("Iran", "Tehran", "伊朗", "德黑兰"),
    ("Iraq", "Baghdad", "伊拉克", "巴格达"),
    ("South Korea", "Seoul", "韩国", "首尔"),
    ("Indonesia", "Jakarta", "印度尼西亚", "雅加达"),
    ("Malaysia", "Kuala Lumpur", "马来西亚", "吉隆坡"),
    ("Nigeria", "Abuja", "尼日利亚", "阿布贾"),
    ("Ethiopia", "Addis Ababa", "埃塞俄比亚", "亚的斯亚贝巴"),
    ("Morocco", "Rabat", "摩洛哥", "拉巴特"),
    ("Colombia", "Bogota", "哥伦比亚", "波哥大"),
    ("Switzerland", "Bern", "瑞士", "伯尔尼"),
    ("Czechia", "Prague", "捷克", "布拉格"),
    ("Romania", "Bucharest", "罗马尼亚", "布加勒斯特"),
    ("Ukraine", "Kyiv", "乌克兰", "基辅"),
    ("Mongolia", "Ulaanbaatar", "蒙古", "乌兰巴托"),
    ("Nepal", "Kathmandu", "尼泊尔", "加德满都"),
    ("Pakistan", "Islamabad", "巴基斯坦", "伊斯兰堡"),
    ("Saudi Arabia", "Riyadh", "沙特阿拉伯", "利雅得"),
    ("New Zealand", "Wellington", "新西兰", "惠灵顿"),
    ("Britain", "London", "英国", "伦敦"),
]

# (english name, symbol, chinese name, atomic number); names capitalised so that a blank at the start of a
# sentence has the same spelling as everywhere else
ELEMENTS = [
    ("Hydrogen", "H", "氢", 1),
    ("Helium", "He", "氦", 2),
    ("Lithium", "Li", "锂", 3),
    ("Carbon", "C", "碳", 6),
    ("Nitrogen", "N", "氮", 7),
    ("Oxygen", "O", "氧", 8),
    ("Fluorine", "F", "氟", 9),
    ("Neon", "Ne", "氖", 10),
    ("Sodium", "Na", "钠", 11),
    ("Magnesium", "Mg", "镁", 12),
    ("Aluminium", "Al", "铝", 13),
    ("Silicon", "Si", "硅", 14),
    ("Phosphorus", "P", "磷", 15),
    ("Sulfur", "S", "硫", 16),
    ("Chlorine", "Cl", "氯", 17),
    ("Argon", "Ar", "氩", 18),
    ("Potassium", "K", "钾", 19),
    ("Calcium", "Ca", "钙", 20),
    ("Iron", "Fe", "铁", 26),
    ("Nickel", "Ni", "镍", 28),
    ("Copper", "Cu", "铜", 29),
    ("Zinc", "Zn", "锌", 30),
    ("Silver", "Ag", "银", 47),
    ("Tin", "Sn", "锡", 50),
    ("Iodine", "I", "碘", 53),
    ("Platinum", "Pt", "铂", 78),
    ("Gold", "Au", "金", 79),
    ("Mercury", "Hg", "汞", 80),
    ("Lead", "Pb", "铅", 82),
    ("Uranium", "U", "铀", 92),
]

ORDINALS_EN = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
ORDINALS_ZH = ["一", "二", "三", "四", "五", "六", "七", "八"]
PLANETS = [
    ("Mercury", "水星"),
    ("Venus", "金星"),
    ("Earth", "地球"),
    ("Mars", "火星"),
    ("Jupiter", "木星"),
    ("Saturn", "土星"),
    ("Uranus", "天王星"),
    ("Neptune", "海王星"),
]

OPPOSITES = [
    ("hot", "cold", "热", "冷"),
    ("big", "small", "大", "小"),
    ("up", "down", "上", "下"),
    ("fast", "slow", "快", "慢"),
    ("happy", "sad", "高兴", "难过"),
    ("early", "late", "早", "晚"),
    ("full", "empty", "满", "空"),
    ("high", "low", "高", "低"),
    ("long", "short", "长", "短"),
    ("rich", "poor", "富", "穷"),
    ("hard", "soft", "硬", "软"),
    ("wet", "dry", "湿", "干"),
    ("strong", "weak", "强", "弱"),
    ("inside", "outside", "里面", "外面"),
    ("left", "right", "左", "右"),
    ("push", "pull", "推", "拉"),
    ("buy", "sell", "买", "卖"),
    ("win", "lose", "赢", "输"),
    ("begin", "end", "开始", "结束"),
    ("love", "hate", "爱", "恨"),
    ("day", "night", "白天", "黑夜"),
    ("north", "south", "北", "南"),
    ("east", "west", "东", "西"),
    ("thick", "thin", "厚", "薄"),
    ("heavy", "light", "重", "轻"),
    ("clean", "dirty", "干净", "脏"),
    ("true", "false", "真", "假"),
    ("easy", "difficult", "容易", "困难"),
    ("friend", "enemy", "朋友", "敌人"),
    ("cheap", "expensive", "便宜", "贵"),
    ("near", "far", "近", "远"),
    ("come", "go", "来", "去"),
    ("question", "answer", "问题", "答案"),
    ("summer", "winter", "夏天", "冬天"),
    ("old", "new", "旧", "新"),
    ("open", "shut", "开", "关"),
]


COLOURS = [
    ("grass", "green", "草", "绿色"),
    ("the sky", "blue", "天空", "蓝色"),
    ("snow", "white", "雪", "白色"),
    ("coal", "black", "煤", "黑色"),
    ("blood", "red", "血", "红色"),
    ("a banana", "yellow", "香蕉", "黄色"),
    ("chocolate", "brown", "巧克力", "棕色"),
    ("milk", "white", "牛奶", "白色"),
    ("a lemon", "yellow", "柠檬", "黄色"),
    ("a tomato", "red", "番茄", "红色"),
    ("a crow", "black", "乌鸦", "黑色"),
    ("a leaf", "green", "树叶", "绿色"),
]

# Each relation: templates per language with placeholders {X} and {Y}, and which slots may be
# blanked (a slot whose answer is not unique given the other, like a colour's object, is never blanked).
# English templates never start with a blankable lower-case word, so an answer is spelled the same in
# every template (no "hot" here, "Hot" there).
RELATIONS: dict[str, dict] = {
    "capital": {
        "en": [
            "The capital of {X} is {Y}.",
            "{Y} is the capital of {X}.",
            "{X} has its capital in {Y}.",
            "The government of {X} sits in {Y}.",
        ],
        "zh": ["{X}的首都是{Y}。", "{Y}是{X}的首都。", "{X}的首都位于{Y}。", "{X}政府设在{Y}。"],
        "slots": ("X", "Y"),
    },
    "symbol": {
        "en": [
            "The chemical symbol for {X} is {Y}.",
            "{Y} is the symbol of {X}.",
            "The element {X} is written as {Y}.",
            "In chemistry, {Y} stands for {X}.",
        ],
        "zh": ["{X}的化学符号是{Y}。", "{Y}是{X}的元素符号。", "元素{X}写作{Y}。", "化学中{Y}代表{X}。"],
        "slots": ("X", "Y"),
    },
    "atomic_number": {
        "en": [
            "The atomic number of {X} is {Y}.",
            "{X} has atomic number {Y}.",
            "Element number {Y} is {X}.",
        ],
        "zh": ["{X}的原子序数是{Y}。", "{Y}号元素是{X}。", "元素{X}的原子序数为{Y}。"],
        "slots": ("X", "Y"),
    },
    "planet": {
        "en": [
            "{X} is the {Y} planet from the Sun.",
            "The {Y} planet from the Sun is {X}.",
            "Counting from the Sun, {X} comes {Y}.",
        ],
        "zh": ["{X}是离太阳第{Y}近的行星。", "离太阳第{Y}近的行星是{X}。", "从太阳数起，{X}排在第{Y}位。"],
        "slots": ("X", "Y"),
    },
    "opposite": {
        "en": [
            "The opposite of {X} is {Y}.",
            "The word {Y} is the opposite of {X}.",
            "The words {X} and {Y} are opposites.",
        ],
        "zh": ["{X}的反义词是{Y}。", "{Y}是{X}的反义词。", "{X}和{Y}意思相反。"],
        "slots": ("X", "Y"),
    },
    "colour": {
        "en": ["The colour of {X} is {Y}.", "{X} is {Y} in colour.", "Most {X} you see is {Y}."],
        "zh": ["{X}的颜色是{Y}。", "{X}是{Y}的。", "{X}通常是{Y}的。"],
        "slots": ("Y",),
    },
}
# the colour template "Most {X} you see is {Y}." reads oddly with articles; strip them there
_ARTICLES = ("a ", "the ")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def relation_facts() -> dict[str, list[tuple[str, str, str, str]]]:
    """Every relation's facts as (en X, en Y, zh X, zh Y), in a fixed order."""
    return {
        "capital": CAPITALS,
        "symbol": [(en, sym, zh, sym) for en, sym, zh, _ in ELEMENTS],
        "atomic_number": [(en, str(n), zh, str(n)) for en, _, zh, n in ELEMENTS],
        "planet": [(en, ORDINALS_EN[i], zh, ORDINALS_ZH[i]) for i, (en, zh) in enumerate(PLANETS)],
        "opposite": OPPOSITES,
        "colour": COLOURS,
    }


@dataclass
class Sentence:
    """One training sentence and the character spans a blank may cover (its answers)."""

    text: str
    lang: str  # "en" | "zh"
    kind: str  # "fact" | "arith"
    relation: str
    slots: list[tuple[int, int]] = field(default_factory=list)
    group: str = ""  # sentences about the same fact or the same addition triple share a group


@dataclass
class Item:
    """One held-out question: `prompt` holds exactly one [MASK]; `answer` is the text that fills it."""

    prompt: str
    answer: str
    lang: str
    kind: str  # "fact" | "arith"
    relation: str


def render(template: str, x: str, y: str, lang: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fill {X} and {Y}; return the sentence and each slot's character span."""
    if lang == "en" and template.startswith("Most {X}"):
        for article in _ARTICLES:
            x = x[len(article) :] if x.startswith(article) else x
    text, spans, rest = "", {}, template
    while rest:
        i = min((rest.find(p) for p in ("{X}", "{Y}") if p in rest), default=-1)
        if i < 0:
            text += rest
            break
        text += rest[:i]
        name, value = rest[i + 1], (x if rest[i + 1] == "X" else y)
        if not text and lang == "en":
            value = _capitalise(value)
        spans[name] = (len(text), len(text) + len(value))
        text += value
        rest = rest[i + 3 :]
    return text, spans


def blank(text: str, span: tuple[int, int]) -> tuple[str, str]:
    """Replace text[span] by [MASK]; return (prompt, answer)."""
    return text[: span[0]] + MASK + text[span[1] :], text[span[0] : span[1]]


ARITH_TEMPLATES = {
    "en": {"plus": "{a} plus {b} equals {c}.", "minus": "{a} minus {b} equals {c}."},
    "zh": {"plus": "{a}加{b}等于{c}。", "minus": "{a}减{b}等于{c}。"},
}


def arith_sentence(lang: str, op: str, a: int, b: int, c: int) -> Sentence:
    """`a op b = c` as a sentence; its group is the addition triple it states."""
    template = ARITH_TEMPLATES[lang][op]
    text = template.format(a=a, b=b, c=c)
    # every number is a blankable slot (blanking an operand is the inverse problem: also arithmetic)
    slots, start = [], 0
    for number in (str(a), str(b), str(c)):
        i = text.index(number, start)
        slots.append((i, i + len(number)))
        start = i + len(number)
    total = c if op == "plus" else a
    group = f"arith:{lang}:{min(total - b, b)}+{max(total - b, b)}"
    return Sentence(text, lang, "arith", op, slots, group)


def build_corpus(seed: int = 0, heldout_fraction: float = 0.08, max_operand: int = 99) -> dict:
    """The whole corpus: {"train": [Sentence], "heldout": [Item], "stats": {...}}; deterministic in `seed`."""
    rng = random.Random(seed)
    train: list[Sentence] = []
    heldout: list[Item] = []

    for relation, facts in relation_facts().items():
        spec = RELATIONS[relation]
        for fact in facts:
            for lang in ("en", "zh"):
                x, y = (fact[0], fact[1]) if lang == "en" else (fact[2], fact[3])
                templates = spec[lang]
                held = rng.randrange(len(templates))
                for t, template in enumerate(templates):
                    text, spans = render(template, x, y, lang)
                    slots = [spans[s] for s in spec["slots"]]
                    if t == held:
                        for span in slots:
                            prompt, answer = blank(text, span)
                            heldout.append(Item(prompt, answer, lang, "fact", relation))
                    else:
                        train.append(Sentence(text, lang, "fact", relation, slots, f"{relation}:{lang}:{fact[0]}"))

    pairs = [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]
    n_held = round(heldout_fraction * len(pairs))
    held_pairs = sorted(rng.sample(pairs, n_held))
    held_set = set(held_pairs)
    for a, b in pairs:
        c = a + b
        triples = [(a, b)] if a == b else [(a, b), (b, a)]
        if (a, b) in held_set:
            for lang in ("en", "zh"):
                x, y = triples[rng.randrange(len(triples))]
                s = arith_sentence(lang, "plus", x, y, c)  # x + y = [MASK]
                heldout.append(Item(*blank(s.text, s.slots[2]), lang, "arith", "plus"))
                s = arith_sentence(lang, "minus", c, y, x)  # c - y = [MASK]
                heldout.append(Item(*blank(s.text, s.slots[2]), lang, "arith", "minus"))
            continue
        for lang in ("en", "zh"):
            for x, y in triples:
                train.append(arith_sentence(lang, "plus", x, y, c))
                train.append(arith_sentence(lang, "minus", c, y, x))

    stats = {
        "seed": seed,
        "train_sentences": len(train),
        "train_fact_sentences": sum(s.kind == "fact" for s in train),
        "train_arith_sentences": sum(s.kind == "arith" for s in train),
        "heldout_items": len(heldout),
        "heldout_fact_items": sum(i.kind == "fact" for i in heldout),
        "heldout_arith_items": sum(i.kind == "arith" for i in heldout),
        "heldout_operand_pairs": n_held,
        "operand_pairs": len(pairs),
    }
    return {"train": train, "heldout": heldout, "stats": stats}


def check_split(corpus: dict) -> None:
    """Assert the split's promises: no held-out sentence (blank filled in) occurs in training, and no
    training arithmetic sentence uses a held-out operand pair (in either order, as sum or difference)."""
    train_texts = {s.text for s in corpus["train"]}
    held_pairs = set()
    for item in corpus["heldout"]:
        full = item.prompt.replace(MASK, item.answer)
        if full in train_texts:
            raise AssertionError(f"held-out sentence leaked into training: {full!r}")
        if item.kind == "arith":
            s = arith_sentence(item.lang, item.relation, *_numbers(full))
            a, b, c = (int(s.text[i:j]) for i, j in s.slots)
            held_pairs.add(frozenset((a, b)) if item.relation == "plus" else frozenset((b, c)))
    for s in corpus["train"]:
        if s.kind == "arith":
            a, b, c = (int(s.text[i:j]) for i, j in s.slots)
            summands = frozenset((a, b)) if s.relation == "plus" else frozenset((b, c))
            if summands in held_pairs:
                raise AssertionError(f"held-out operand pair leaked into training: {s.text!r}")


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/default_model/corpus"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    corpus = build_corpus(args.seed)
    check_split(corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train.jsonl", "w", encoding="utf-8") as f:
        for s in corpus["train"]:
            f.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")
    with open(args.out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for item in corpus["heldout"]:
            f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
    with open(args.out / "sentences.txt", "w", encoding="utf-8") as f:
        for s in corpus["train"]:
            f.write(s.text + "\n")
    (args.out / "stats.json").write_text(json.dumps(corpus["stats"], indent=2) + "\n")
    print(json.dumps(corpus["stats"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
