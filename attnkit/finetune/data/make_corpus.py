"""Regenerate ``corpus.txt``: the small text corpus shipped for ``attnkit finetune --quick``.

Everything here was written for attnkit (no text is taken from elsewhere): a few hand-written
essays, then a deterministic "village almanac" built from hand-written sentence templates
(weather reports, market prices, letters, recipes, arithmetic and counting drills). The mix gives
a tiny model both free prose and regular structure, so its loss falls visibly within a few
minutes of CPU training. Run ``python attnkit/finetune/data/make_corpus.py`` to rebuild; the
output is the same on every machine (a seeded ``random.Random``).
"""

from __future__ import annotations

import random
from pathlib import Path

ESSAYS = [
    """On Rivers
A river is a patient thing. It does not hurry to the sea, and yet it never stops going there.
In spring it carries the snow of the hills down past the mill, brown and loud, and the miller
lifts his wheel out of the water so the flood will not break it. In summer the same river is
thin and clear, and children wade across it at the ford, holding their shoes above their heads.
By autumn the leaves ride on it like small boats, and in winter it talks quietly under a skin
of ice. People who live beside a river learn to read it the way others read a calendar.""",
    """On Lamps
Before the wires came, every house in the valley kept a lamp in the window on the longest
nights. The lamp was not for the people inside; they knew their way around their own rooms in
the dark. It was for whoever might be walking on the road: a late traveller, a doctor coming
back from a birth, a neighbour who had stayed too long at the inn. A lamp in a window says
that someone is awake, and that the road is not as empty as it looks.""",
    """On Counting
The shepherd counts his sheep twice, once when they leave the fold and once when they return.
If the numbers agree he sleeps; if they do not, he takes the lantern and goes back up the
hill. Counting is older than writing. Notches on a stick, pebbles in a bag, knots on a cord:
each is a way of making a promise to yourself that you will notice when something is missing.""",
    """On Bread
Bread asks for four things: flour, water, salt and time. The first three are cheap. The
fourth is the one people try to save, and it is the one the loaf remembers. Dough that is
rushed bakes into a dense, pale brick; dough that is left to rise slowly, in a cool room,
overnight, comes out of the oven with a dark crust that crackles as it cools on the rack.""",
    """On Maps
A map is a list of decisions about what to leave out. The map of the county shows the roads
and the rivers but not the hedges; the map of the farm shows the hedges but not the roads
beyond the gate. Nobody could use a map that showed everything, because it would be as large
as the land itself and twice as confusing. The art is in choosing what matters for the walk
you are about to take.""",
    """On Letters
A letter travels more slowly than news, and that is its virtue. By the time it arrives the
writer has already changed a little, and the reader knows it, and reads kindly. The letter
keeps a moment still: the weather on the day it was written, the price of eggs, the name of
the new schoolteacher, a complaint about the post office that will be forgotten by spring.""",
    """On Machines
The first engine in the village was a pump. It stood in a shed by the well and coughed every
morning, and the blacksmith was the only person who understood it. When it stopped, he opened
its side and looked inside for a long time before he touched anything. Machines, he said, are
honest: they do exactly what they were built to do, and the trouble is only that we forget
what that was.""",
    """On Winter
Winter in the hills begins with a smell, not a frost. One morning the air is sharp and clean
and smells faintly of iron, and the old people say the snow is three days off. They are
usually right. The woodpile is checked, the roof is looked at, the hens are moved closer to
the house, and the long evenings of mending and reading and talking begin.""",
    """On Learning
A child learning to read first sees shapes, then letters, then words, and at last stops seeing
any of them and sees only the story. The same thing happens to a carpenter learning joints, a
cook learning sauces, a clerk learning accounts. At the start every step is separate and
heavy; at the end the steps disappear and only the work remains. Practice is the name we give
to the long middle part, where the steps are slowly forgotten.""",
    """On Roads
The old road follows the contour of the hill because the carts that made it could not climb
straight up. The new road cuts through the hill because the machines that made it could.
Walking the old road takes longer, but you see the whole valley open beneath you at the bend
where the chestnut trees are, and you arrive less tired than you would think.""",
]

VILLAGES = ["Ashford", "Brindle", "Caldwell", "Dunmore", "Elmstead", "Fairholt", "Glenridge",
            "Hollins", "Ivybridge", "Kettering Cross", "Longmeadow", "Millbrook", "Northwick",
            "Oakhurst", "Pennyfield", "Quarry End", "Redcliff", "Stonebridge", "Thornbury", "Upwell"]
NAMES = ["Ada", "Bram", "Clara", "Dmitri", "Edith", "Felix", "Greta", "Hugo", "Ines", "Jonah",
         "Kit", "Lena", "Milo", "Nora", "Otto", "Pia", "Ruth", "Silas", "Tess", "Walter"]
GOODS = [("eggs", "dozen"), ("flour", "sack"), ("butter", "pound"), ("apples", "basket"),
         ("wool", "bale"), ("cheese", "wheel"), ("honey", "jar"), ("candles", "box"),
         ("salt", "bag"), ("potatoes", "sack"), ("cider", "barrel"), ("nails", "pound")]
SKIES = ["clear", "overcast", "hazy", "grey", "bright", "stormy", "misty", "cloudless"]
WINDS = ["north", "south", "east", "west", "north-east", "south-west"]
WEATHER = ["rain in the afternoon", "a light frost before dawn", "fog on the river",
           "a warm wind from the hills", "snow on the high pasture", "showers clearing by evening",
           "thunder over the quarry", "a still, dry day"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TASKS = ["mend the fence by the lower field", "bring the sheep down from the ridge",
         "clean the chimney before the cold comes", "take the grain to the mill",
         "repair the bridge over the brook", "paint the schoolhouse door",
         "dig the new drain behind the inn", "plant the beans along the south wall",
         "carry the letters to the station", "fix the broken wheel of the cart"]
DISHES = [("barley soup", ["barley", "onions", "carrots", "a bay leaf", "salt"]),
          ("apple cake", ["apples", "flour", "butter", "eggs", "sugar"]),
          ("bean stew", ["beans", "garlic", "tomatoes", "thyme", "olive oil"]),
          ("oat biscuits", ["oats", "butter", "honey", "a pinch of salt"]),
          ("leek pie", ["leeks", "cream", "pastry", "pepper", "cheese"]),
          ("pea porridge", ["dried peas", "water", "an onion", "salt", "mint"])]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]


def weather(r: random.Random, village: str, day: str) -> str:
    sky, wind, w = r.choice(SKIES), r.choice(WINDS), r.choice(WEATHER)
    lo = r.randint(-4, 12)
    hi = lo + r.randint(3, 11)
    return (f"Weather for {village}, {day}: {sky} skies, wind from the {wind}, expect {w}. "
            f"Lowest {lo} degrees, highest {hi} degrees.")


def market(r: random.Random, village: str) -> str:
    lines = [f"Market prices at {village}:"]
    for good, unit in r.sample(GOODS, 4):
        lines.append(f"- {good}: {r.randint(2, 60)} pence the {unit}")
    return "\n".join(lines)


def letter(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    v = r.choice(VILLAGES)
    month = r.choice(MONTHS)
    task = r.choice(TASKS)
    good, unit = r.choice(GOODS)
    mood = r.choice(["short", "long", "busy", "quiet"])
    return (f"Dear {b},\nIt is {month} here in {v} and the days are {mood}. "
            f"Tomorrow we must {task}, so I will not come to the market. Please keep a {unit} of "
            f"{good} for me, and tell {r.choice(NAMES)} that the book is on the shelf by the door.\n"
            f"With love,\n{a}")


def recipe(r: random.Random) -> str:
    dish, parts = r.choice(DISHES)
    n = r.randint(2, 8)
    steps = ", then ".join(["wash and chop", "warm the pot", "add everything", "stir slowly",
                            "leave it to rest"][: r.randint(3, 5)])
    return (f"Recipe: {dish} for {n} people. You need {', '.join(parts[:-1])} and {parts[-1]}. "
            f"First {steps}. Cook for {r.randint(2, 9) * 5} minutes and serve warm.")


def arithmetic(r: random.Random) -> str:
    out = []
    for _ in range(4):
        a, b = r.randint(0, 10), r.randint(0, 10)
        if r.random() < 0.5:
            out.append(f"{NUMBER_WORDS[a]} and {NUMBER_WORDS[b]} make {NUMBER_WORDS[a + b]}.")
        else:
            out.append(f"{a} + {b} = {a + b}.")
    return " ".join(out)


def counting(r: random.Random) -> str:
    start = r.randint(1, 12)
    length = r.randint(4, 8)
    return "Counting: " + ", ".join(NUMBER_WORDS[i] for i in range(start, min(start + length, 21))) + "."


def diary(r: random.Random) -> str:
    who = r.choice(NAMES)
    day = r.choice(DAYS)
    return (f"{day}. {who} went to {r.choice(VILLAGES)} to {r.choice(TASKS)}. The road was "
            f"{r.choice(['muddy', 'dry', 'icy', 'dusty', 'flooded by the ford'])}, and it took "
            f"{NUMBER_WORDS[r.randint(2, 9)]} hours. In the evening there was {r.choice(WEATHER)}.")


def build(target_bytes: int = 300_000, seed: int = 7) -> str:
    r = random.Random(seed)
    parts = list(ESSAYS)
    makers = [lambda: weather(r, r.choice(VILLAGES), r.choice(DAYS)), lambda: market(r, r.choice(VILLAGES)),
              lambda: letter(r), lambda: recipe(r), lambda: arithmetic(r), lambda: counting(r),
              lambda: diary(r)]
    size = sum(len(p) + 2 for p in parts)
    while size < target_bytes:
        if r.random() < 0.04:
            piece = r.choice(ESSAYS)  # the essays recur, as favourite texts do in an almanac
        else:
            piece = r.choice(makers)()
        parts.append(piece)
        size += len(piece) + 2
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    path = Path(__file__).with_name("corpus.txt")
    path.write_text(build(), encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)")
