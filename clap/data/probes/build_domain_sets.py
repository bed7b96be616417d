"""Writes the encyclopedic, commonsense and compositional probe sets of this folder from the facts below.

Why a script: every fact here is hand-written common knowledge (no dataset is copied), but the corrupted prompt of
each probe must have the clean prompt's token length under both GPT-2's and SmolLM2's tokenizers, and its answer a
different single token. Choosing that partner by hand for several hundred probes is error-prone, so the rule is
written down once: a probe's corruption swaps its subject for another subject of the same relation whose answer
differs and whose prompt has the same token length under both tokenizers; among those, the one used least often as
a partner so far, then the nearest after it in the list. Subjects without a partner, and facts whose answer is not
one token under both tokenizers, are left out (``write`` lists them).

Two-hop probes ("reasoning"): a chain subject -> bridge -> answer (the Eiffel Tower -> France -> Paris) is written
as three probes: the first hop, the second hop (``knowledge_type: one_hop``) and the composition (``two_hop``), whose
``composes`` lists the two hops' ids. The composition's corruption prefers its first hop's partner, so the wrong
answer is the partner's bridge's answer.

    PYTHONPATH=. python clap/data/probes/build_domain_sets.py write     # -> *-all.jsonl (every probe written)
    for s in encyclopedic commonsense compositional; do
        python -m clap probes check clap/data/probes/$s-all.jsonl --model smollm2-135m -o checks/$s.csv; done
    PYTHONPATH=. python clap/data/probes/build_domain_sets.py select checks   # -> the valid probes, *.jsonl

Labels (the same three on every probe of every shipped set, so one study can read them all): ``knowledge_type``
(``definitional`` / ``associative`` as in the epilepsy sets; ``one_hop`` / ``two_hop`` in the compositional set),
``topic`` (the set's domain: ``epilepsy``, ``encyclopedic``, ``commonsense``, ``compositional``) and ``subject``.
The domain label is called ``topic`` because clap sorts label columns by name and takes the first as the default
group of ``clap analyze``: a ``domain`` label would sort before ``knowledge_type`` and become that default in every
study of these files. Provenance is list-valued (``source``: kind of knowledge, the fact, the corruption's fact;
``composes``), which clap sets aside rather than making a label.

``select`` keeps the probes that ``clap probes check`` marks valid (the model knows the fact and the corruption
flips it); in the compositional set a composition is kept only with both of its hops valid, and a hop only when a
kept composition uses it, so every kept chain can be compared with its own parts.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = ("encyclopedic", "commonsense", "compositional")

# (relation, knowledge_type, template with {S}, provenance sentence with {S} and {A}, kind of knowledge, facts).
# knowledge_type: "definitional" = what the subject is (its category, what a term means or a thing is for);
# "associative" = what the subject goes with (another entity or a property), as in the epilepsy sets.
# --- encyclopedic ------------------------------------------------------------------------------------------
# (relation, knowledge_type, template with {S}, sentence template for provenance with {S} {A}, kind, items)
ENCYCLOPEDIC = [
    ("capital", "associative", "The capital of {S} is", "{A} is the capital of {S}", "world geography", [
        ("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"),
        ("England", "London"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
        ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Denmark", "Copenhagen"),
        ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"), ("Peru", "Lima"),
        ("Cuba", "Havana"), ("Canada", "Ottawa"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
        ("Belgium", "Brussels"), ("Scotland", "Edinburgh"), ("Afghanistan", "Kabul"), ("Syria", "Damascus"),
        ("Lebanon", "Beirut"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Venezuela", "Caracas"),
        ("Australia", "Canberra"), ("Nepal", "Kathmandu"), ("Pakistan", "Islamabad"), ("Vietnam", "Hanoi"),
        ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("South Korea", "Seoul"),
        ("the Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Iceland", "Reykjavik"),
        ("Wales", "Cardiff"), ("Saudi Arabia", "Riyadh"), ("Jamaica", "Kingston"), ("Ukraine", "Kyiv"),
    ]),
    ("language", "associative", "The official language of {S} is", "the official language of {S} is {A}",
     "world geography", [
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"), ("Brazil", "Portuguese"),
        ("Greece", "Greek"), ("Poland", "Polish"), ("Turkey", "Turkish"), ("Sweden", "Swedish"),
        ("the Netherlands", "Dutch"), ("South Korea", "Korean"), ("Egypt", "Arabic"), ("Israel", "Hebrew"),
        ("Thailand", "Thai"), ("Vietnam", "Vietnamese"), ("Finland", "Finnish"), ("Hungary", "Hungarian"),
        ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Iran", "Persian"),
        ("Portugal", "Portuguese"), ("Ukraine", "Ukrainian"), ("Indonesia", "Indonesian"),
    ]),
    ("currency", "associative", "The currency of {S} is the", "the currency of {S} is the {A}", "world economy", [
        ("Japan", "yen"), ("Britain", "pound"), ("America", "dollar"), ("China", "yuan"), ("India", "rupee"),
        ("Russia", "ruble"), ("Mexico", "peso"), ("Switzerland", "franc"), ("Germany", "euro"),
        ("South Korea", "won"), ("Brazil", "real"), ("Poland", "zloty"), ("Sweden", "krona"),
        ("Thailand", "baht"), ("Israel", "shekel"), ("Turkey", "lira"), ("Vietnam", "dong"), ("France", "euro"),
        ("Italy", "euro"), ("Spain", "euro"), ("Canada", "dollar"), ("Australia", "dollar"),
        ("Denmark", "krone"), ("Egypt", "pound"), ("Pakistan", "rupee"), ("Argentina", "peso"),
        ("South Africa", "rand"), ("Hungary", "forint"),
    ]),
    ("author", "associative", "{S} was written by", "{S} was written by {A} (first name given as the answer)",
     "literature", [
        ("Hamlet", "William"), ("Macbeth", "William"), ("Oliver Twist", "Charles"),
        ("Pride and Prejudice", "Jane"), ("War and Peace", "Leo"), ("The Odyssey", "Homer"),
        ("Don Quixote", "Miguel"), ("Animal Farm", "George"), ("Faust", "Johann"),
        ("Les Misérables", "Victor"), ("Moby-Dick", "Herman"), ("Frankenstein", "Mary"), ("Dracula", "Bram"),
        ("The Divine Comedy", "Dante"), ("Crime and Punishment", "Fyodor"), ("Tom Sawyer", "Mark"),
        ("Anna Karenina", "Leo"), ("Jane Eyre", "Charlotte"), ("Wuthering Heights", "Emily"),
        ("The Raven", "Edgar"), ("Robinson Crusoe", "Daniel"), ("Treasure Island", "Robert"),
        ("The Jungle Book", "Rudyard"), ("The Iliad", "Homer"), ("The Republic", "Plato"),
        ("Great Expectations", "Charles"), ("Romeo and Juliet", "William"), ("Gulliver's Travels", "Jonathan"),
        ("The Old Man and the Sea", "Ernest"), ("Madame Bovary", "Gustave"), ("Paradise Lost", "John"),
        ("A Christmas Carol", "Charles"), ("The Little Prince", "Antoine"), ("Das Kapital", "Karl"),
    ]),
    ("occupation", "definitional", "{S} is best known as a", "{S} is best known as a {A}", "history and biography", [
        ("Mozart", "composer"), ("Beethoven", "composer"), ("Bach", "composer"), ("Chopin", "composer"),
        ("Picasso", "painter"), ("Rembrandt", "painter"), ("Monet", "painter"), ("Van Gogh", "painter"),
        ("Einstein", "physicist"), ("Newton", "scientist"), ("Darwin", "naturalist"),
        ("Shakespeare", "playwright"), ("Plato", "philosopher"), ("Aristotle", "philosopher"),
        ("Socrates", "philosopher"), ("Confucius", "philosopher"), ("Nietzsche", "philosopher"),
        ("Homer", "poet"), ("Dante", "poet"), ("Dickens", "novelist"), ("Tolstoy", "novelist"),
        ("Napoleon", "general"), ("Galileo", "astronomer"), ("Copernicus", "astronomer"), ("Edison", "inventor"),
        ("Columbus", "explorer"), ("Magellan", "explorer"), ("Pavarotti", "singer"), ("Elvis", "singer"),
        ("Michelangelo", "sculptor"), ("Freud", "psychologist"), ("Gagarin", "cosmonaut"),
    ]),
    ("category", "definitional", "{S} is a large", "{S} is a {A}", "world geography", [
        ("Jupiter", "planet"), ("Saturn", "planet"), ("Mars", "planet"), ("Everest", "mountain"),
        ("Kilimanjaro", "mountain"), ("The Amazon", "river"), ("The Nile", "river"), ("The Danube", "river"),
        ("The Sahara", "desert"), ("The Gobi", "desert"), ("The Pacific", "ocean"), ("The Atlantic", "ocean"),
        ("Greenland", "island"), ("Madagascar", "island"), ("Sicily", "island"), ("Tokyo", "city"),
        ("London", "city"), ("Chicago", "city"), ("Asia", "continent"), ("Africa", "continent"),
        ("Russia", "country"), ("Canada", "country"), ("Brazil", "country"), ("Lake Superior", "lake"),
    ]),
    ("study_of", "definitional", "{S} is the study of", "{S} is the study of {A}", "science vocabulary", [
        ("Biology", "life"), ("Geology", "rocks"), ("Astronomy", "stars"), ("Zoology", "animals"),
        ("Botany", "plants"), ("Psychology", "mind"), ("Sociology", "society"), ("Cardiology", "heart"),
        ("Ornithology", "birds"), ("Entomology", "insects"), ("Meteorology", "weather"), ("History", "past"),
        ("Linguistics", "language"), ("Economics", "money"), ("Theology", "God"), ("Oncology", "cancer"),
        ("Dermatology", "skin"), ("Genetics", "genes"), ("Mycology", "fungi"), ("Paleontology", "fossils"),
        ("Anatomy", "body"), ("Seismology", "earthquakes"), ("Ecology", "environment"),
        ("Hydrology", "water"), ("Chemistry", "matter"), ("Pharmacology", "drugs"),
    ]),
    ("unit_of", "definitional", "The {S} is a unit of", "the {S} is a unit of {A}", "science vocabulary", [
        ("metre", "length"), ("kilogram", "mass"), ("second", "time"), ("ampere", "current"),
        ("volt", "voltage"), ("watt", "power"), ("joule", "energy"), ("kelvin", "temperature"),
        ("newton", "force"), ("litre", "volume"), ("hertz", "frequency"), ("byte", "information"),
        ("ohm", "resistance"), ("pascal", "pressure"), ("calorie", "energy"), ("decibel", "sound"),
        ("acre", "area"), ("knot", "speed"), ("mile", "distance"), ("pound", "weight"),
    ]),
]

# --- commonsense -------------------------------------------------------------------------------------------
COMMONSENSE = [
    ("kind_of", "definitional", "{S} are a kind of", "{S} are a kind of {A}", "everyday categories", [
        ("Apples", "fruit"), ("Bananas", "fruit"), ("Carrots", "vegetable"), ("Potatoes", "vegetable"),
        ("Eagles", "bird"), ("Sparrows", "bird"), ("Sharks", "fish"), ("Hammers", "tool"),
        ("Screwdrivers", "tool"), ("Trucks", "vehicle"), ("Buses", "vehicle"), ("Violins", "instrument"),
        ("Guitars", "instrument"), ("Roses", "flower"), ("Tulips", "flower"), ("Oaks", "tree"),
        ("Pines", "tree"), ("Ants", "insect"), ("Beetles", "insect"), ("Chairs", "furniture"),
        ("Sofas", "furniture"), ("Snakes", "reptile"), ("Lizards", "reptile"), ("Whales", "mammal"),
        ("Shirts", "clothing"), ("Jackets", "clothing"), ("Diamonds", "gem"), ("Daisies", "flower"),
        ("Onions", "vegetable"), ("Cherries", "fruit"), ("Wolves", "mammal"), ("Crocodiles", "reptile"),
    ]),
    ("used_to", "definitional", "A {S} is used to", "a {S} is used to {A}", "everyday objects and their use", [
        ("knife", "cut"), ("pen", "write"), ("broom", "sweep"), ("ladder", "climb"), ("key", "unlock"),
        ("thermometer", "measure"), ("shovel", "dig"), ("needle", "sew"), ("towel", "dry"), ("lamp", "light"),
        ("bed", "sleep"), ("cup", "drink"), ("chair", "sit"), ("camera", "take"), ("telephone", "call"),
        ("fridge", "keep"), ("helmet", "protect"), ("map", "find"), ("spoon", "eat"), ("stove", "cook"),
        ("microscope", "magnify"), ("calculator", "calculate"), ("vacuum", "clean"),
        ("hose", "water"), ("lock", "secure"), ("whistle", "signal"), ("rope", "tie"),
    ]),
    ("colour", "associative", "The color of {S} is", "the color of {S} is {A}", "everyday perception", [
        ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"), ("the sky", "blue"),
        ("bananas", "yellow"), ("milk", "white"), ("lemons", "yellow"), ("tomatoes", "red"),
        ("chocolate", "brown"), ("strawberries", "red"), ("carrots", "orange"), ("the ocean", "blue"),
        ("leaves", "green"), ("cherries", "red"), ("soot", "black"), ("emeralds", "green"),
        ("sapphires", "blue"), ("rubies", "red"), ("pumpkins", "orange"), ("limes", "green"),
        ("pearls", "white"), ("ravens", "black"), ("flamingos", "pink"), ("coffee", "brown"),
        ("charcoal", "black"), ("lavender", "purple"), ("violets", "purple"), ("cream", "white"),
    ]),
    ("gives", "associative", "{S} give us", "{S} give us {A}", "farm animals and plants", [
        ("Cows", "milk"), ("Bees", "honey"), ("Hens", "eggs"), ("Sheep", "wool"), ("Silkworms", "silk"),
        ("Chickens", "eggs"), ("Goats", "milk"), ("Trees", "wood"), ("Plants", "oxygen"), ("Pigs", "bacon"),
    ]),
    ("eats", "associative", "{S} like to eat", "{S} like to eat {A}", "animal behaviour", [
        ("Monkeys", "bananas"), ("Rabbits", "carrots"), ("Mice", "cheese"), ("Cows", "grass"),
        ("Pandas", "bamboo"), ("Dogs", "bones"), ("Squirrels", "nuts"), ("Horses", "hay"), ("Lions", "meat"),
        ("Birds", "seeds"), ("Bears", "honey"), ("Frogs", "flies"), ("Anteaters", "ants"), ("Penguins", "fish"),
        ("Termites", "wood"), ("Caterpillars", "leaves"), ("Cats", "mice"), ("Owls", "mice"),
    ]),
    ("sound", "associative", "The sound a {S} makes is called a", "the sound a {S} makes is a {A}",
     "animal behaviour", [
        ("dog", "bark"), ("cat", "meow"), ("cow", "moo"), ("lion", "roar"), ("duck", "quack"),
        ("snake", "hiss"), ("horse", "neigh"), ("pig", "oink"), ("bee", "buzz"), ("wolf", "howl"),
        ("owl", "hoot"), ("frog", "croak"), ("mouse", "squeak"), ("donkey", "bray"), ("bird", "chirp"),
    ]),
    ("material", "associative", "Most {S} are made of", "most {S} are made of {A}", "everyday objects", [
        ("windows", "glass"), ("tables", "wood"), ("coins", "metal"), ("bricks", "clay"), ("tires", "rubber"),
        ("candles", "wax"), ("books", "paper"), ("sweaters", "wool"), ("jeans", "cotton"), ("shoes", "leather"),
        ("mirrors", "glass"), ("igloos", "ice"), ("boxes", "cardboard"), ("statues", "stone"),
        ("balloons", "rubber"), ("nails", "steel"), ("pencils", "wood"), ("sails", "cloth"),
        ("necklaces", "gold"), ("bottles", "plastic"), ("snowmen", "snow"), ("envelopes", "paper"),
    ]),
    ("habitat", "associative", "{S} live in the", "{S} live in the {A}", "animal habitats", [
        ("Fish", "water"), ("Camels", "desert"), ("Whales", "ocean"), ("Monkeys", "jungle"), ("Bears", "forest"),
        ("Penguins", "Antarctic"), ("Polar bears", "Arctic"), ("Moles", "ground"), ("Bats", "caves"),
        ("Frogs", "pond"), ("Dolphins", "sea"), ("Worms", "soil"), ("Cows", "field"), ("Gorillas", "rainforest"),
        ("Squirrels", "trees"), ("Scorpions", "desert"),
    ]),
    ("taste", "associative", "The taste of {S} is", "the taste of {S} is {A}", "everyday perception", [
        ("honey", "sweet"), ("lemons", "sour"), ("salt", "salty"), ("coffee", "bitter"), ("sugar", "sweet"),
        ("vinegar", "sour"), ("chili", "spicy"), ("candy", "sweet"), ("seawater", "salty"), ("limes", "sour"),
        ("pepper", "spicy"), ("chocolate", "sweet"),
    ]),
    ("temperature", "associative", "{S} is very", "{S} is very {A}", "everyday perception", [
        ("Ice", "cold"), ("Fire", "hot"), ("Snow", "cold"), ("Lava", "hot"), ("Steam", "hot"), ("The sun", "hot"),
        ("Antarctica", "cold"), ("The desert", "hot"), ("Frost", "cold"), ("Boiling water", "hot"),
    ]),
    ("body", "associative", "We {S} with our", "we {S} with our {A}", "the human body", [
        ("see", "eyes"), ("hear", "ears"), ("smell", "noses"), ("taste", "tongues"), ("walk", "feet"),
        ("think", "brains"), ("breathe", "lungs"), ("chew", "teeth"), ("touch", "fingers"), ("kick", "feet"),
        ("clap", "hands"), ("blink", "eyes"),
    ]),
    ("legs", "associative", "The number of legs a {S} has is", "a {S} has {A} legs", "animal anatomy", [
        ("spider", "eight"), ("dog", "four"), ("bird", "two"), ("ant", "six"), ("cat", "four"),
        ("chicken", "two"), ("beetle", "six"), ("horse", "four"), ("duck", "two"), ("fly", "six"),
        ("scorpion", "eight"), ("human", "two"),
    ]),
]

# --- two-hop compositions ----------------------------------------------------------------------------------
# first hops: subject -> bridge; second hops: bridge -> answer; a chain = (first-hop relation, second-hop relation)
HOP1 = {
    "landmark_country": ("{S} is located in the country of", "{S} is in {A}", "world landmarks", [
        ("The Eiffel Tower", "France"), ("The Colosseum", "Italy"), ("Big Ben", "England"),
        ("The Kremlin", "Russia"), ("The Great Wall", "China"), ("The Brandenburg Gate", "Germany"),
        ("The Acropolis", "Greece"), ("The Sagrada Familia", "Spain"), ("The Pyramids of Giza", "Egypt"),
        ("Mount Fuji", "Japan"), ("Machu Picchu", "Peru"), ("The Statue of Liberty", "America"),
        ("The Parthenon", "Greece"), ("The Leaning Tower of Pisa", "Italy"), ("The Louvre", "France"),
        ("Red Square", "Russia"), ("The Forbidden City", "China"), ("The Alhambra", "Spain"),
        ("Stonehenge", "England"), ("The Sphinx", "Egypt"), ("The Sydney Opera House", "Australia"),
        ("The CN Tower", "Canada"), ("The Hagia Sophia", "Turkey"), ("The Golden Gate Bridge", "America"),
        ("Neuschwanstein Castle", "Germany"), ("The Little Mermaid statue", "Denmark"), ("The Taj Mahal", "India"),
        ("Angkor Wat", "Cambodia"),
    ]),
    "person_country": ("{S} was born in the country of", "{S} was born in {A}", "history and biography", [
        ("Mozart", "Austria"), ("Einstein", "Germany"), ("Picasso", "Spain"), ("Tolstoy", "Russia"),
        ("Confucius", "China"), ("Dante", "Italy"), ("Shakespeare", "England"), ("Chopin", "Poland"),
        ("Beethoven", "Germany"), ("Van Gogh", "Netherlands"), ("Cleopatra", "Egypt"), ("Plato", "Greece"),
        ("Sibelius", "Finland"), ("Ibsen", "Norway"), ("Hans Christian Andersen", "Denmark"),
        ("Liszt", "Hungary"), ("Cervantes", "Spain"), ("Goethe", "Germany"), ("Victor Hugo", "France"),
        ("Dostoevsky", "Russia"), ("Galileo", "Italy"), ("James Joyce", "Ireland"),
        ("Alfred Nobel", "Sweden"), ("Molière", "France"), ("Pushkin", "Russia"), ("Dickens", "England"),
    ]),
    "company_country": ("{S} is a company from the country of", "{S} is a company from {A}", "world economy", [
        ("Toyota", "Japan"), ("Sony", "Japan"), ("Honda", "Japan"), ("Nintendo", "Japan"), ("Ferrari", "Italy"),
        ("Fiat", "Italy"), ("BMW", "Germany"), ("Volkswagen", "Germany"), ("Mercedes", "Germany"),
        ("Samsung", "Korea"), ("Hyundai", "Korea"), ("IKEA", "Sweden"), ("Volvo", "Sweden"),
        ("Nokia", "Finland"), ("Renault", "France"), ("Peugeot", "France"), ("Lego", "Denmark"),
        ("Heineken", "Netherlands"), ("Philips", "Netherlands"), ("Zara", "Spain"), ("Huawei", "China"),
        ("Lenovo", "China"), ("Porsche", "Germany"), ("Lamborghini", "Italy"), ("Gazprom", "Russia"),
    ]),
}
HOP2 = {
    "country_capital": ("The capital city of {S} is", "the capital of {S} is {A}", "world geography", {
        "France": "Paris", "Italy": "Rome", "England": "London", "Russia": "Moscow", "China": "Beijing",
        "Germany": "Berlin", "Greece": "Athens", "Spain": "Madrid", "Egypt": "Cairo", "Japan": "Tokyo",
        "Peru": "Lima", "America": "Washington", "Australia": "Canberra", "Canada": "Ottawa", "Turkey": "Ankara",
        "Switzerland": "Bern", "Denmark": "Copenhagen", "Austria": "Vienna",
        "Poland": "Warsaw", "Netherlands": "Amsterdam", "Finland": "Helsinki", "Norway": "Oslo",
        "Hungary": "Budapest", "Ireland": "Dublin", "Sweden": "Stockholm", "Korea": "Seoul",
        "Cambodia": "Phnom",
    }),
    "country_language": ("The people of {S} speak", "the people of {S} speak {A}", "world geography", {
        "France": "French", "Italy": "Italian", "England": "English", "Russia": "Russian", "China": "Chinese",
        "Germany": "German", "Greece": "Greek", "Spain": "Spanish", "Egypt": "Arabic", "Japan": "Japanese",
        "Peru": "Spanish", "America": "English", "Turkey": "Turkish", "Denmark": "Danish",
        "Austria": "German", "Poland": "Polish", "Netherlands": "Dutch", "Finland": "Finnish",
        "Norway": "Norwegian", "Hungary": "Hungarian", "Sweden": "Swedish", "Korea": "Korean",
        "Ireland": "English",
    }),
}
TWO_HOP = [  # (first hop, second hop, two-hop template)
    ("landmark_country", "country_capital", "{S} is located in a country whose capital is"),
    ("landmark_country", "country_language", "{S} is located in a country whose people speak"),
    ("person_country", "country_capital", "{S} was born in a country whose capital is"),
    ("company_country", "country_language", "{S} is a company from a country whose people speak"),
]


Fact = dict  # one probe record as written to the JSONL files


def tokenizers(gpt2_folder: Path) -> list:
    """GPT-2's tokenizer (vocab.json + merges.txt; the slow class, since the fast one silently builds an empty
    tokenizer from those files) and SmolLM2's (the built-in GGUF, converted once into clap's cache)."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    from clap.models import builtin_gguf_path, convert_gguf

    vocab = json.loads((gpt2_folder / "vocab.json").read_text())
    lines = (gpt2_folder / "merges.txt").read_text().split("\n")[1:]
    gpt2 = GPT2Tokenizer(vocab=vocab, merges=[tuple(line.split(" ")) for line in lines if line])
    return [gpt2, AutoTokenizer.from_pretrained(str(convert_gguf(builtin_gguf_path("smollm2-135m"))))]


class Writer:
    """Pairs subjects into clean/corrupted probes under the token constraints of both tokenizers."""

    def __init__(self, toks: list) -> None:
        self.toks = toks
        self.dropped: list[tuple[str, str, str, str, str]] = []  #: (set, relation, subject, answer, why)

    def lengths(self, text: str) -> tuple[int, ...]:
        return tuple(len(t(text)["input_ids"]) for t in self.toks)

    def one_token(self, word: str) -> bool:
        return all(len(t(" " + word, add_special_tokens=False)["input_ids"]) == 1 for t in self.toks)

    def usable(self, name: str, rel: str, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The facts whose answer is one token under both tokenizers (the others are recorded as dropped)."""
        keep = [(s, a) for s, a in items if self.one_token(a)]
        self.dropped += [(name, rel, s, a, "answer not one token") for s, a in items if not self.one_token(a)]
        return keep

    def partner(self, i: int, keep: list[tuple], template: str, used: dict[int, int]) -> int | None:
        """The partner of fact i: a fact that differs from it in every answer (the bridge too, in a chain) and whose
        prompt has the same token lengths; the least used partner so far, then the nearest after i."""
        clean = self.lengths(fill(template, keep[i][0]))
        m = len(keep)
        candidates = [j for j in ((i + k) % m for k in range(1, m))
                      if differs(keep[i], keep[j]) and self.lengths(fill(template, keep[j][0])) == clean]
        if not candidates:
            return None
        best = min(candidates, key=lambda j: (used.get(j, 0), (j - i) % m))
        used[best] = used.get(best, 0) + 1
        return best

    def simple(self, name: str, prefix: str, relations: list[tuple]) -> list[Fact]:
        """One probe per fact of each relation (the encyclopedic and commonsense sets)."""
        rows = []
        for rel, ktype, template, sentence, kind, items in relations:
            keep = self.usable(name, rel, items)
            used: dict[int, int] = {}
            for i, (s, a) in enumerate(keep):
                j = self.partner(i, keep, template, used)
                if j is None:
                    self.dropped.append((name, rel, s, a, "no same-length partner"))
                    continue
                s2, a2 = keep[j]
                rows.append(record(f"{prefix}-{rel.replace('_', '-')}-{slug(s)}", ktype, name, template, s, a, s2, a2,
                                   [f"common knowledge ({kind}; relation: {rel})", sentence.format(S=s, A=a),
                                    "corruption: " + sentence.format(S=s2, A=a2)]))
        return rows

    def hops(self, tables: dict, which: str) -> tuple[dict, dict]:
        """One-hop probes of each relation in ``tables``, by (relation, subject); and each one's partner."""
        rows, partners = {}, {}
        for rel, (template, sentence, kind, items) in tables.items():
            keep = self.usable("compositional", rel, list(items.items()) if isinstance(items, dict) else items)
            used: dict[int, int] = {}
            for i, (s, a) in enumerate(keep):
                j = self.partner(i, keep, template, used)
                if j is None:
                    self.dropped.append(("compositional", rel, s, a, "no same-length partner"))
                    continue
                s2, a2 = keep[j]
                partners[(rel, s)] = s2
                rows[(rel, s)] = record(f"oh-{rel.replace('_', '-')}-{slug(s)}", "one_hop", "compositional", template,
                                        s, a, s2, a2,
                                        [f"common knowledge ({kind}; relation: {rel}; {which} hop)",
                                         sentence.format(S=s, A=a), "corruption: " + sentence.format(S=s2, A=a2)],
                                        composes=[])
        return rows, partners

    def compositional(self) -> list[Fact]:
        """First hops, second hops and the compositions that chain them (the hops first, in table order)."""
        second, _ = self.hops(HOP2, "second")
        first, first_partner = self.hops(HOP1, "first")
        used_first, used_second, chains = set(), set(), []
        for rel1, rel2, template in TWO_HOP:
            table = HOP2[rel2][3]
            keep = [(s, b, table[b]) for s, b in HOP1[rel1][3] if (rel1, s) in first and (rel2, b) in second]
            used: dict[int, int] = {}
            for i, (s, b, a) in enumerate(keep):
                preferred = next((j for j, x in enumerate(keep) if x[0] == first_partner.get((rel1, s))), None)
                if preferred is not None and differs(keep[i], keep[preferred]) and (
                        self.lengths(fill(template, keep[preferred][0])) == self.lengths(fill(template, s))):
                    j = preferred
                else:
                    j = self.partner(i, keep, template, used)
                if j is None:
                    self.dropped.append(("compositional", f"{rel1}>{rel2}", s, a, "no same-length partner"))
                    continue
                s2, b2, a2 = keep[j]
                hop1, hop2 = first[(rel1, s)], second[(rel2, b)]
                used_first.add((rel1, s))
                used_second.add((rel2, b))
                chains.append(record(
                    f"th-{rel1.split('_')[0]}-{rel2.split('_')[1]}-{slug(s)}", "two_hop", "compositional", template,
                    s, a, s2, a2,
                    [f"composition of two common-knowledge facts ({rel1} then {rel2})",
                     f"{hop1['source'][1]}; {hop2['source'][1]}",
                     f"corruption: {HOP1[rel1][1].format(S=s2, A=b2)}; {HOP2[rel2][1].format(S=b2, A=a2)}"],
                    composes=[hop1["id"], hop2["id"]]))
        return ([row for key, row in first.items() if key in used_first]
                + [row for key, row in second.items() if key in used_second] + chains)


def differs(fact: tuple, other: tuple) -> bool:
    """Whether ``other`` (subject, answer) or (subject, bridge, answer) differs from ``fact`` in every answer."""
    return all(x != y for x, y in zip(fact[1:], other[1:], strict=True))


def slug(text: str) -> str:
    """An id part: ASCII, lower case, leading article dropped."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"^(the|a|an) ", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def fill(template: str, subject: str) -> str:
    """The prompt; capitalised when the subject opens it."""
    out = template.replace("{S}", subject)
    return cap(out) if template.startswith("{S}") else out


def record(probe_id: str, ktype: str, topic: str, template: str, s: str, a: str, s2: str, a2: str,
           source: list[str], composes: list[str] | None = None) -> Fact:
    """One probe line: labels (knowledge_type, topic, subject), prompts, answers, provenance (lists are provenance
    to clap: set aside, never labels)."""
    row = {"id": probe_id, "knowledge_type": ktype, "topic": topic,
           "subject": cap(s) if template.startswith("{S}") else s, "clean": fill(template, s),
           "corrupted": fill(template, s2), "answer": " " + a, "wrong": " " + a2}
    if composes is not None:
        row["composes"] = composes
    row["source"] = source
    return row


def write_jsonl(path: Path, rows: list[Fact]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[Fact]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_all(gpt2_folder: Path) -> None:
    """Every probe written, per set, to ``SET-all.jsonl``; the facts left out are printed."""
    writer = Writer(tokenizers(gpt2_folder))
    sets = {"encyclopedic": writer.simple("encyclopedic", "enc", ENCYCLOPEDIC),
            "commonsense": writer.simple("commonsense", "cs", COMMONSENSE),
            "compositional": writer.compositional()}
    for name, rows in sets.items():
        assert len({r["id"] for r in rows}) == len(rows) and len({r["clean"] for r in rows}) == len(rows), name
        write_jsonl(HERE / f"{name}-all.jsonl", rows)
        print(f"{name}: {len(rows)} probes written {dict(Counter(r['knowledge_type'] for r in rows))}")
    for item in writer.dropped:
        print("left out:", *item)


def select(checks: Path) -> None:
    """The valid probes of each ``SET-all.jsonl`` (per ``checks/SET.csv`` of ``clap probes check``) to ``SET.jsonl``;
    compositions only with both hops valid, hops only when a kept composition uses them."""
    for name in SETS:
        rows = read_jsonl(HERE / f"{name}-all.jsonl")
        with open(checks / f"{name}.csv", newline="") as handle:
            valid = {row["id"]: row["valid"] == "True" for row in csv.DictReader(handle)}
        if set(valid) != {r["id"] for r in rows}:
            sys.exit(f"{checks / name}.csv does not check {name}-all.jsonl (ids differ)")
        kept = [r for r in rows if valid[r["id"]]]
        if name == "compositional":
            chains = [r for r in kept if r["composes"] and all(valid[c] for c in r["composes"])]
            parts = {c for r in chains for c in r["composes"]}
            kept = [r for r in kept if r["id"] in parts or r in chains]
        write_jsonl(HERE / f"{name}.jsonl", kept)
        print(f"{name}: {len(kept)} of {len(rows)} kept {dict(Counter(r['knowledge_type'] for r in kept))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    write = actions.add_parser("write", help="write SET-all.jsonl (every probe)")
    write.add_argument("--gpt2-tokenizer", type=Path, default=HERE.parents[2].parent / "shared/data/gpt2-tokenizer",
                       help="folder with GPT-2's vocab.json and merges.txt (default ../shared/data/gpt2-tokenizer)")
    keep = actions.add_parser("select", help="write SET.jsonl (the valid probes)")
    keep.add_argument("checks", type=Path, help="folder with SET.csv from `clap probes check SET-all.jsonl -o`")
    args = parser.parse_args()
    write_all(args.gpt2_tokenizer) if args.action == "write" else select(args.checks)


if __name__ == "__main__":
    main()
