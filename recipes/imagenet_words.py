"""Build show_attend_tell/labels/imagenet_words.json: which caption words each ImageNet class stands for.

Run `python recipes/imagenet_words.py` after editing CONCEPTS or TEMPLATES; tests/test_guidance.py checks the
shipped JSON is this script's output. How it was built: every rule below was written by hand from the 1,000 ImageNet
class names (torchvision's list), each range checked against the names it covers. A class maps to a concept
only when a photo that the classifier gives that class is normally described with one of the concept's words
(a Labrador retriever is "a dog", an espresso is "coffee", a stove is in "a kitchen"); classes with no such
everyday word (clothing, most tools, rare animals) are left out, so they never guide a caption. Forms are the
concept's word, its plural and close synonyms a caption may use instead: a guided caption must contain one of
them (a disjunctive constraint). A model whose vocabulary lacks every form of a concept never uses it.

Templates: a caption written for a concept that a model trained on Flickr8k's people and dogs has no words around.
Its captions mention a cup, mug or coffee in 99 of 40,460 and never open with one, so guided decoding still writes
"a small child is sitting on a red plastic cup" of the espresso. A template is one everyday sentence per still-life
or room concept (food and drink on a table, a computer on a desk, a bathroom with a toilet), written by hand from
the concept's classes with words the shipped model's vocabulary has. None was reworded after scoring; one was
dropped after a review of its classes ("a book on a table" for book, whose classes include bookcase, bookshop and
library). It replaces the decoded caption only when the concept is the image's most probable one and reaches the
template threshold, chosen on coco-dev and Flickr8k val (recipes/tune_guidance.py). Animals, vehicles, sports and
outdoor scenes have none: there the decoder's own sentence, guided to the label's word, says more than a template.
"""

from __future__ import annotations

import json
from pathlib import Path

from torchvision.models import ResNet50_Weights

OUT = Path(__file__).resolve().parent.parent / "show_attend_tell" / "labels" / "imagenet_words.json"


def span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


# concept word: (forms, ImageNet class indices)
CONCEPTS: dict[str, tuple[list[str], list[int]]] = {
    "dog": (["dog", "dogs", "puppy", "puppies"], span(151, 268)),
    "cat": (["cat", "cats", "kitten", "kittens"], span(281, 285)),
    "bird": (["bird", "birds"], span(9, 20) + span(22, 24) + span(80, 96) + [99] + span(127, 143) + span(145, 146)),
    # ImageNet's "kite" is the bird; in everyday photos the classifier gives it to the toy as well
    "kite": (["kite", "kites", "bird", "birds"], [21]),
    "chicken": (["chicken", "chickens", "rooster", "hen", "bird", "birds"], [7, 8]),
    "duck": (["duck", "ducks", "bird", "birds"], [97, 98]),
    "swan": (["swan", "swans", "bird", "birds"], [100]),
    "pelican": (["pelican", "pelicans", "bird", "birds"], [144]),
    "fish": (["fish", "fishes"], span(0, 6) + span(389, 397)),
    "frog": (["frog", "frogs"], span(30, 32)),
    "crocodile": (["crocodile", "alligator"], [49, 50]),
    "snake": (["snake", "snakes"], span(52, 68)),
    "tiger": (["tiger", "tigers"], [292]),
    "bear": (["bear", "bears"], span(294, 297)),
    "teddy": (["teddy", "bear"], [850]),
    "bee": (["bee", "bees"], [309]),
    "rabbit": (["rabbit", "rabbits", "bunny"], span(330, 332)),
    "squirrel": (["squirrel", "squirrels"], [335]),
    "horse": (["horse", "horses", "pony"], [339, 603]),
    "cow": (["cow", "cows", "cattle", "bull", "bulls"], [345, 346, 347]),
    "sheep": (["sheep", "lamb", "ram"], [348, 349]),
    "goat": (["goat", "goats"], [350]),
    "deer": (["deer"], span(351, 353)),
    "camel": (["camel", "camels"], [354]),
    "monkey": (["monkey", "monkeys"], span(365, 382)),
    "elephant": (["elephant", "elephants"], [101, 385, 386]),
    "zebra": (["zebra", "zebras"], [340]),
    "airplane": (["airplane", "airplanes", "plane", "planes", "jet", "jets"], [404, 895, 908]),
    "boat": (
        ["boat", "boats", "ship", "ships", "sailboat", "canoe", "kayak"],
        [403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 871, 914],
    ),
    "bus": (["bus", "buses"], [654, 779, 874]),
    "train": (["train", "trains", "tram", "trolley"], [466, 547, 565, 705, 820, 829]),
    "car": (["car", "cars", "taxi"], [436, 468, 475, 479, 511, 581, 609, 627, 656, 661, 751, 817]),
    "truck": (["truck", "trucks", "van"], [555, 569, 675, 717, 734, 864, 867]),
    "motorcycle": (["motorcycle", "motorcycles", "motorbike", "scooter"], [665, 670]),
    "bicycle": (["bicycle", "bicycles", "bike", "bikes", "tricycle"], [444, 671, 870, 880]),
    "pizza": (["pizza", "pizzas"], [963]),
    "sandwich": (["sandwich", "burger", "hamburger"], [933]),
    "hotdog": (["hotdog", "hotdogs"], [934]),
    "broccoli": (["broccoli"], [937]),
    "banana": (["banana", "bananas"], [954]),
    "orange": (["orange", "oranges"], [950]),
    "apple": (["apple", "apples"], [948]),
    "food": (
        ["food", "meal", "plate", "dish"],
        [923, 924, 925, 927, 931, 932, 935, 959, 960, 962, 964, 965],
    ),
    "kitchen": (
        ["kitchen", "stove", "oven", "refrigerator", "fridge", "microwave"],
        [534, 544, 567, 651, 760, 766, 827, 859, 909],
    ),
    "bathroom": (["bathroom", "toilet", "bathtub", "tub", "shower", "sink"], [435, 794, 804, 861, 876, 896, 999]),
    "couch": (["couch", "couches", "sofa"], [831]),
    "television": (["television", "tv"], [548, 598, 851]),
    "computer": (
        ["computer", "computers", "laptop", "laptops", "monitor", "screen", "keyboard"],
        [508, 527, 590, 620, 664, 673, 681, 782],
    ),
    "desk": (["desk"], [526]),
    "bed": (["bed", "beds"], [516, 520, 564, 750]),
    "umbrella": (["umbrella", "umbrellas"], [879]),
    "tennis": (["tennis", "racket"], [752, 852]),
    "baseball": (["baseball", "bat"], [429, 981]),
    "basketball": (["basketball"], [430]),
    "volleyball": (["volleyball"], [890]),
    "soccer": (["soccer", "football"], [805]),
    "rugby": (["rugby"], [768]),
    "golf": (["golf"], [574, 575]),
    "ski": (["ski", "skis", "skiing", "skier"], [795]),
    "snowmobile": (["snowmobile"], [802]),
    "tractor": (["tractor"], [866]),
    "bench": (["bench", "benches"], [703]),
    "coffee": (["coffee", "cup", "mug"], [504, 505, 550, 967, 968]),
    "bottle": (["bottle", "bottles"], [440, 720, 737, 898, 901, 907]),
    "wine": (["wine", "glass"], [966]),
    "beer": (["beer", "glass"], [441]),
    "bowl": (["bowl", "bowls"], [659, 809]),
    "table": (["table", "tables"], [532]),
    "chair": (["chair", "chairs"], [423, 559, 765]),
    "book": (["book", "books"], [453, 454, 624, 917, 921]),
    "tie": (["tie", "ties"], [451, 457, 906]),
    "bag": (["bag", "bags", "backpack", "purse", "suitcase"], [414, 636, 728, 748]),
    "phone": (["phone", "cellphone", "telephone"], [487, 528, 707]),
    "traffic": (["traffic"], [920]),
    "sign": (["sign", "signs"], [919]),
    "fountain": (["fountain"], [562]),
    "church": (["church"], [497]),
    "barn": (["barn"], [425]),
    "tent": (["tent", "tents"], [672]),
    "bridge": (["bridge"], [821, 839]),
    "lake": (["lake"], [975]),
    "beach": (["beach", "ocean", "shore"], [978]),
    "mountain": (["mountain", "mountains"], [970]),
}

# concept word: its template caption
TEMPLATES: dict[str, str] = {
    "pizza": "a pizza on a table",
    "orange": "an orange on a table",
    "apple": "an apple on a table",
    "food": "a plate of food on a table",
    "bowl": "a bowl of food on a table",
    "coffee": "a cup of coffee on a table",
    "wine": "a glass of wine on a table",
    "beer": "a glass of beer on a table",
    "bottle": "a bottle on a table",
    "computer": "a laptop computer on a desk",
    "desk": "a desk in an office",
    "kitchen": "a kitchen with a stove and a refrigerator",
    "bathroom": "a bathroom with a toilet",
    "couch": "a living room with a couch",
    "television": "a living room with a tv",
    "bed": "a bed in a bedroom",
}


def build() -> dict:
    """The JSON document: one entry per concept, its forms and the ImageNet classes (index and name) behind it."""
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    seen: dict[int, str] = {}
    concepts = []
    for word, (forms, classes) in CONCEPTS.items():
        for index in classes:
            if index in seen:
                raise ValueError(f"class {index} ({names[index]}) maps to both {seen[index]} and {word}")
            seen[index] = word
        entry = {"word": word, "forms": forms, "classes": {str(i): names[i] for i in sorted(classes)}}
        if word in TEMPLATES:
            template = TEMPLATES[word].split()
            if not set(forms) & set(template):
                raise ValueError(f"the template of {word} names none of its forms: {TEMPLATES[word]!r}")
            entry["template"] = TEMPLATES[word]
        concepts.append(entry)
    if TEMPLATES.keys() - CONCEPTS.keys():
        raise ValueError(f"templates for no concept: {sorted(TEMPLATES.keys() - CONCEPTS.keys())}")
    return {
        "format": 2,
        "built_by": "recipes/imagenet_words.py",
        "how": " ".join(__doc__.split("\n\n", 1)[1].split()),
        "concepts": concepts,
    }


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    classes = sum(len(c[1]) for c in CONCEPTS.values())
    print(f"{OUT}: {len(CONCEPTS)} concepts, {classes} classes, {len(TEMPLATES)} templates")
