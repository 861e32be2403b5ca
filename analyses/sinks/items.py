"""Template-generated items for the ACT tasks: >= 200 held-out items per task, plus a calibration split.

The hand-written sets in ``data/sinks/*.txt`` (64 items per task) leave ~30 held-out items, too few
to see a few points of accuracy. :func:`generate` crosses sentence frames with slot lists (dozens
of words per slot, several frames per label) into distinct items, deterministically from a seed,
and assigns each a fixed split (``calib`` or ``heldout``, balanced per label). The result ships as
``data/sinks/large/<task>.tsv`` (``label<TAB>split<TAB>text``); a test regenerates it and checks it
is unchanged. Load it with ``load_task("<task>@large")``. Method notes: docs/methods.md §2.

>>> rows = generate("qtype", per_label=4, seed=0)
>>> len(rows), sorted({r[0] for r in rows}), sorted({r[1] for r in rows})
(16, ['description', 'location', 'number', 'person'], ['calib', 'heldout'])
"""
from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

from probe.atomic import write_text
from probe.errors import InputError

from ..data import data_path
PER_LABEL = {"sentiment": 240, "topic": 120, "qtype": 120}   # items per label (half calib, half held-out)

_S = {
    "thing": "film movie documentary novel album play series musical thriller comedy memoir drama sequel "
             "cartoon western biopic".split(),
    "aspect": "acting plot script soundtrack pacing dialogue ending photography cast direction characters "
              "humour visuals story editing".split(),
    "pos": "brilliant wonderful moving charming gripping delightful superb witty touching beautiful clever "
           "inventive heartfelt stunning thrilling tender joyful graceful lively memorable".split(),
    "neg": "dull tedious clumsy lifeless boring shallow predictable awful messy bland forgettable dreary "
           "painful pointless sloppy grating hollow stale confused lazy".split(),
    "pos_feel": ["smiling", "in tears of joy", "wanting more", "deeply moved", "humming the songs",
                 "full of hope", "grinning", "talking about it for hours"],
    "neg_feel": ["checking our watches", "half asleep", "annoyed", "bored stiff", "wanting a refund",
                 "relieved it was over", "cold and tired", "confused and irritated"],
    "pos_verb": ["loved", "adored", "enjoyed every minute of", "was won over by", "was delighted by",
                 "fell for", "cannot stop praising", "would gladly watch again"],
    "neg_verb": ["hated", "regretted", "could not finish", "was bored by", "was let down by",
                 "struggled through", "cannot recommend", "would never sit through again"],
    "intens": ["truly", "really", "utterly", "remarkably", "quite simply", "wholly", "thoroughly", "rather"],
}
_SENTIMENT = {
    "positive": ["A {pos} {thing} with {pos2} {aspect}.",
                 "The {aspect} was {pos} and the {aspect2} was {pos2}.",
                 "I {pos_verb} this {thing}; the {aspect} is {intens} {pos}.",
                 "{Pos}, {pos2} and {pos3}.",
                 "We left the {thing} {pos_feel}.",
                 "Its {aspect} is {intens} {pos}, and nothing about the {aspect2} disappoints.",
                 "A {intens} {pos} {thing}: {pos2} {aspect} and {pos3} {aspect2}."],
    "negative": ["A {neg} {thing} with {neg2} {aspect}.",
                 "The {aspect} was {neg} and the {aspect2} was {neg2}.",
                 "I {neg_verb} this {thing}; the {aspect} is {intens} {neg}.",
                 "{Neg}, {neg2} and {neg3}.",
                 "We left the {thing} {neg_feel}.",
                 "Its {aspect} is {intens} {neg}, and nothing about the {aspect2} helps.",
                 "A {intens} {neg} {thing}: {neg2} {aspect} and {neg3} {aspect2}."],
}
_T = {
    "city": "Lisbon Denver Osaka Leeds Porto Lyon Turin Perth Austin Dublin Bergen Quito Accra Hanoi Krakow "
            "Seville Malmo Tampa Bristol Geneva".split(),
    "mascot": "Hawks Tigers Rovers Falcons Sharks Wolves Comets Bears Lions Pirates Giants Eagles".split(),
    "comp": ["league", "cup", "championship", "tournament", "open", "series"],
    "stage": ["final", "semifinal", "quarterfinal", "playoffs", "title race"],
    "athlete": ["striker", "goalkeeper", "sprinter", "swimmer", "pitcher", "boxer", "cyclist", "captain",
                "midfielder", "tennis player", "skier", "point guard"],
    "feat": ["scored twice", "set a national record", "won gold", "was sent off", "retired at thirty-four",
             "signed a new contract", "missed a late penalty", "broke the world record", "returned from injury",
             "was named player of the year"],
    "firm": "Norvex Altaro Quindell Brightwave Corvana Helix Maxford Pellico Ternary Velmont Zandor Orrin".split(),
    "sector": ["carmaker", "bank", "airline", "retailer", "chipmaker", "insurer", "oil company", "brewer",
               "software firm", "steel maker"],
    "move": ["rose", "fell", "jumped", "slid", "climbed", "tumbled"],
    "why": ["quarterly profits beat forecasts", "sales disappointed investors", "the chief executive resigned",
            "a merger was announced", "the regulator opened an inquiry", "demand weakened in Asia",
            "it raised its dividend", "costs rose faster than expected"],
    "body": ["central bank", "finance ministry", "stock exchange", "trade commission"],
    "policy": ["raised interest rates", "cut interest rates", "held interest rates steady", "tightened lending rules",
               "warned about inflation", "lowered its growth forecast"],
    "sci": ["researchers", "astronomers", "biologists", "physicists", "chemists", "geologists", "engineers",
            "climate scientists"],
    "found": ["discovered", "measured", "observed", "identified", "mapped", "simulated"],
    "object": ["a new species of frog", "water ice on a distant moon", "the oldest known fossil of a bird",
               "a gene linked to ageing", "a faint galaxy near the edge of the universe",
               "a cheaper way to store solar energy", "a bacterium that digests plastic",
               "ripples in space from merging black holes", "a protein that repairs damaged nerves",
               "microplastics in Antarctic snow"],
    "venue": ["in a new study", "with a space telescope", "in a laboratory experiment", "using a supercomputer",
              "in deep ocean samples", "in the journal Nature"],
    "country": "Peru Norway Kenya Vietnam Chile Poland Ghana Canada Egypt Brazil Japan Spain Nepal Mexico "
               "Morocco Finland".split(),
    "leader": ["president", "prime minister", "foreign minister", "opposition leader", "parliament"],
    "act": ["called an early election", "signed a peace agreement", "announced new border controls",
            "visited the flooded region", "met rebel leaders", "resigned after protests",
            "won a vote of confidence", "expelled two diplomats"],
    "crowd": ["thousands of protesters", "striking workers", "rescue teams", "refugees", "voters",
              "peacekeepers"],
    "event": ["gathered in the capital", "marched through the streets", "reached the border",
              "waited for aid after the earthquake", "queued to cast their ballots", "arrived after the ceasefire"],
}
_TOPIC = {
    "sports": ["The {city} {mascot} beat {city2} in the {comp} {stage}.",
               "The {athlete} from {city} {feat} on Saturday.",
               "{city} {mascot} fans celebrated as their {athlete} {feat}.",
               "The {comp} {stage} in {city} ended in a draw after extra time.",
               "A {athlete} {feat} as the {city} {mascot} won the {comp}."],
    "business": ["Shares of the {sector} {firm} {move} after {why}.",
                 "The {body} {policy} on Tuesday.",
                 "{firm}, the {sector}, said {why}.",
                 "{firm} agreed to buy the {sector} {firm2} for a large sum.",
                 "Investors in {firm} were surprised when {why}."],
    "science": ["{Sci} {found} {object} {venue}.",
                "A team of {sci} in {city} {found} {object}.",
                "{Sci} say they have {found} {object}.",
                "Using new instruments, {sci} {found} {object}.",
                "The study by {sci} {found} {object} {venue}."],
    "world": ["The {leader} of {country} {act}.",
              "In {country}, {crowd} {event}.",
              "{crowd} {event} as the {leader} of {country} {act}.",
              "Officials in {country} said {crowd} {event}.",
              "The {leader} of {country} {act} after talks with {country2}."],
}
_Q = {
    "made": ["wrote", "painted", "invented", "discovered", "composed", "founded", "designed", "directed",
             "built", "first climbed"],
    "work": ["the first dictionary of English", "the telescope that found the rings", "the oldest bridge in the city",
             "the anthem of the republic", "the theory of continental drift", "the first vaccine",
             "the famous clock tower", "the novel about the white whale", "the first printing press",
             "the company that makes these engines", "the tallest mountain in the range", "the opera about the sailor"],
    "role": ["scientist", "composer", "explorer", "architect", "painter", "poet", "queen", "general", "inventor",
             "chef", "engineer", "astronaut"],
    "place": ["the Eiffel Tower", "Mount Kilimanjaro", "the Great Barrier Reef", "Machu Picchu", "the Sahara",
              "the Panama Canal", "Angkor Wat", "the Dead Sea", "Lake Titicaca", "the Acropolis",
              "Niagara Falls", "the Gobi Desert", "Table Mountain", "the Alhambra", "the Colosseum",
              "Mount Fuji", "the Amazon rainforest", "Stonehenge", "the Grand Canyon", "Victoria Falls",
              "the Taj Mahal", "Petra", "the Matterhorn", "Lake Baikal", "the Atacama Desert", "Uluru",
              "the Blue Mosque", "the Forbidden City", "Chichen Itza", "the Danube delta"],
    "thing_n": ["bones in the human body", "players on a rugby team", "keys on a piano", "days in a leap year",
                "legs on a spider", "moons of Mars", "strings on a violin", "minutes in a day",
                "sides on a hexagon", "states in the union", "cards in a deck", "teeth in an adult mouth"],
    "measure": ["tall", "deep", "long", "heavy", "old", "far from the sun", "wide", "hot"],
    "concept": ["photosynthesis", "inflation", "a black hole", "democracy", "an allergy", "erosion", "a vaccine",
                "gravity", "a recession", "a metaphor", "evaporation", "a tariff", "an eclipse", "irony",
                "a monopoly", "osmosis", "a sonnet", "friction", "a mortgage", "an ecosystem", "a haiku",
                "compound interest", "a glacier", "a placebo"],
    "device": ["a refrigerator", "a compass", "a jet engine", "a thermostat", "a microwave oven",
               "a solar panel", "a bicycle gear", "a smoke detector", "a telescope", "a battery",
               "a lock and key", "a barometer", "a loudspeaker", "an elevator", "a pressure cooker",
               "a hearing aid"],
    "why": ["leaves change colour in autumn", "the sky looks blue", "cats purr", "bread rises",
            "ice floats on water", "birds migrate", "the tides rise and fall", "onions make people cry",
            "people yawn", "metal feels cold", "the moon changes shape", "volcanoes erupt",
            "coffee keeps people awake", "rainbows appear after rain", "stars twinkle", "milk turns sour"],
}
_QTYPE = {
    "person": ["Who {made} {work}?", "Which {role} {made} {work}?", "Who was the {role} that {made} {work}?",
               "Name the {role} who {made} {work}.", "Whose team {made} {work}?"],
    "location": ["Where is {place} located?", "In which country can you find {place}?",
                 "On which continent is {place}?", "Where would you travel to see {place}?",
                 "In what region of the world is {place}?", "Near which city is {place}?"],
    "number": ["How many {thing_n} are there?", "How {measure} is {place}?", "What is the number of {thing_n}?",
               "In what year was {place} first mapped?", "How many {thing_n} would you count?",
               "Roughly how {measure} is {place}?"],
    "description": ["What is {concept}?", "How does {device} work?", "Why is it that {why}?", "What does {concept} mean?",
                    "Can you explain how {device} works?", "Explain why {why}.", "Describe {concept} in simple words."],
}
SPECS = {"sentiment": (_SENTIMENT, _S), "topic": (_TOPIC, _T), "qtype": (_QTYPE, _Q)}


def _fill(frame: str, slots: dict, rng: random.Random) -> str:
    used: dict[str, list[str]] = {}

    def pick(m):
        raw = m.group(1)
        key = re.sub(r"\d$", "", raw).lower()
        pool = [w for w in slots[key] if w not in used.get(key, [])]
        w = rng.choice(pool)
        used.setdefault(key, []).append(w)
        return w[0].upper() + w[1:] if raw[0].isupper() else w

    text = re.sub(r"\{(\w+)\}", pick, frame)
    return text[0].upper() + text[1:]


def generate(task: str, per_label: int | None = None, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(label, split, text)`` rows: ``per_label`` distinct items per label, alternately calib / held-out."""
    if task not in SPECS:
        raise InputError(f"no generated items for task {task!r}: choose one of {sorted(SPECS)}")
    frames, slots = SPECS[task]
    n = per_label or PER_LABEL[task]
    hand = data_path("sinks", f"{task}.txt")       # never repeat a hand-written item
    seen = {ln.split("\t", 1)[-1].strip().lower() for ln in hand.read_text(encoding="utf-8").splitlines()}
    rng, rows = random.Random(f"{task}:{seed}"), []
    for label, fs in frames.items():
        got, tries = 0, 0
        while got < n:
            tries += 1
            if tries > 200 * n:
                raise InputError(f"{task}/{label}: the frames give fewer than {n} distinct items")
            text = _fill(fs[tries % len(fs)], slots, rng)
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            rows.append((label, "calib" if got % 2 == 0 else "heldout", text))
            got += 1
    return rows


def write(task: str, folder: Path | None = None) -> Path:
    """Write ``<folder>/<task>.tsv`` (default: the shipped ``data/sinks/large/``) from :func:`generate`
    (how the shipped files were made), atomically."""
    folder = Path(folder) if folder else data_path("sinks", "large")
    folder.mkdir(parents=True, exist_ok=True)
    return write_text(folder / f"{task}.tsv", "".join(f"{a}\t{b}\t{c}\n" for a, b, c in generate(task)))


def read(task: str, folder: Path | None = None) -> list[tuple[str, str, str]]:
    folder = Path(folder) if folder else data_path("sinks", "large")
    path = folder / f"{task}.tsv"
    if not path.exists():
        raise InputError(f"{path} is missing: regenerate it with analyses.sinks.items.write({task!r})")
    rows = [tuple(ln.split("\t", 2)) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if any(len(r) != 3 or r[1] not in ("calib", "heldout") for r in rows):
        raise InputError(f"{path}: every line must be label<TAB>calib|heldout<TAB>text")
    return rows


def _interleave(items: list, n_labels: int) -> tuple:
    """The items label by label in turn (order kept within a label), so that every prefix, e.g.
    ``--limit N``, is balanced across labels rather than all of the file's first label."""
    by_label = [[it for it in items if it.label == k] for k in range(n_labels)]
    return tuple(it for group in itertools.zip_longest(*by_label) for it in group if it is not None)


def large_task(name: str, demo_per_label: int = 2, seed: int = 0):
    """The task ``name`` with the generated splits: demonstrations from the hand-written file,
    calibration and held-out items from ``data/sinks/large/<name>.tsv`` (disjoint, fixed split)."""
    import dataclasses

    from .tasks import Item, load_task

    small = load_task(name, demo_per_label=demo_per_label, seed=seed)
    index = {lab: k for k, lab in enumerate(small.labels)}
    rows = read(name)
    unknown = sorted({r[0] for r in rows} - set(index))
    if unknown:
        raise InputError(f"data/sinks/large/{name}.tsv has labels {unknown} the task does not know")
    split = {s: _interleave([Item(t.strip(), index[lab]) for lab, sp, t in rows if sp == s], len(index))
             for s in ("calib", "heldout")}
    return dataclasses.replace(small, name=f"{name}@large", items={"demo": small.items["demo"], **split})
