"""Guided captions: the label -> word data, the label head against torchvision, thresholds, the user's words, and
the shipped model guided on the bundled photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO
from helpers import load_script

from show_attend_tell.captioner import SHIPPED_MODEL, Captioner
from show_attend_tell.cli import main
from show_attend_tell.errors import InputError
from show_attend_tell.guidance import LABEL_WORDS, Guidance, GuideWord, LabelHead, positions
from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary

EXAMPLES = REPO / "examples"


def vocabulary(*words: str) -> Vocabulary:
    return Vocabulary([*SPECIAL_TOKENS, *words])


def test_shipped_label_words_are_the_builders_output_and_map_each_class_once():
    builder = load_script("recipes/imagenet_words.py")
    shipped = json.loads(LABEL_WORDS.read_text())
    assert shipped == json.loads(json.dumps(builder.build()))
    classes = [int(index) for concept in shipped["concepts"] for index in concept["classes"]]
    assert len(classes) == len(set(classes)) and all(0 <= index < 1000 for index in classes)
    by_word = {concept["word"]: concept for concept in shipped["concepts"]}
    assert by_word["cat"]["classes"]["285"] == "Egyptian cat"
    assert by_word["coffee"]["classes"]["967"] == "espresso"
    assert "Labrador retriever" in by_word["dog"]["classes"].values()
    assert by_word["coffee"]["template"] == "a cup of coffee on a table"
    assert "template" not in by_word["dog"]  # the decoder's own sentences about dogs say more
    for concept in shipped["concepts"]:  # a template names its concept, so guidance positions find it
        assert "template" not in concept or set(concept["template"].split()) & set(concept["forms"])


def test_concepts_sum_their_classes_and_only_confident_ones_guide():
    guidance = Guidance(vocabulary("cat", "cats", "dog", "dogs", "coffee"), threshold=0.5, max_label_words=2)
    assert {c.word for c in guidance.concepts} == {"cat", "dog", "coffee"}  # forms the vocabulary lacks drop out
    probabilities = torch.zeros(3, 1000)
    probabilities[0, 281:286] = 0.12  # five cat classes, none above 0.5 alone, 0.6 together
    probabilities[0, 967] = 0.3  # espresso
    probabilities[1, 207] = 0.45  # golden retriever: below the threshold
    probabilities[2, 285], probabilities[2, 151] = 0.5, 0.5
    words = guidance.label_words(probabilities)
    assert [w.word for w in words[0]] == ["cat"]
    assert words[0][0].forms == ("cat", "cats") and words[0][0].source == "label"
    assert words[0][0].probability == pytest.approx(0.6) and words[0][0].label in {"tabby", "Egyptian cat"}
    assert words[1] == []
    assert {w.word for w in words[2]} == {"cat", "dog"}
    assert Guidance(guidance.vocab, threshold=None).label_words(probabilities) == [[], [], []]
    assert Guidance(guidance.vocab, threshold=0.5, max_label_words=1).label_words(probabilities)[2][0].word in {
        "cat",
        "dog",
    }


def test_templates_come_from_the_most_probable_concept_when_it_is_confident():
    words = ("a", "cup", "of", "coffee", "on", "table", "pizza", "cat", "bathroom")
    guidance = Guidance(vocabulary(*words), template_threshold=0.4)
    concepts = {c.word: c for c in guidance.concepts}
    assert concepts["coffee"].template == ("a", "cup", "of", "coffee", "on", "a", "table")
    assert concepts["bathroom"].template is None  # "a bathroom with a toilet": the vocabulary lacks two words
    assert concepts["cat"].template is None  # no template: the decoder writes about cats
    probabilities = torch.zeros(5, 1000)
    probabilities[0, 967] = 0.5  # espresso
    probabilities[1, 967] = 0.35  # below the threshold
    probabilities[2, 285], probabilities[2, 967] = 0.5, 0.45  # a cat first: it has no template, coffee is second
    probabilities[3, 896] = 0.9  # washbasin: the template cannot be written
    probabilities[4, 967], probabilities[4, 963] = 0.45, 0.5  # pizza is the more probable
    coffee, below, cat, bathroom, pizza = guidance.templates(probabilities)
    assert coffee.words == concepts["coffee"].template
    assert coffee.tokens == tuple(guidance.vocab.id(word) for word in coffee.words)
    assert (coffee.guide.word, coffee.guide.label, coffee.guide.probability) == ("coffee", "espresso", 0.5)
    assert coffee.guide.forms == ("coffee", "cup")
    assert below is None and cat is None and bathroom is None
    assert " ".join(pizza.words) == "a pizza on a table" and pizza.guide.label == "pizza"
    assert Guidance(guidance.vocab, template_threshold=None).templates(probabilities) == [None] * 5
    assert Guidance(guidance.vocab, threshold=None).templates(probabilities) == [None] * 5  # labels off


def test_users_words_get_their_plurals_and_unknown_words_name_close_ones():
    guidance = Guidance(vocabulary("sofa", "cat", "cats", "couch", "coffee"))
    sofa, cats = guidance.user_words(["Sofa", "cats"])
    assert (sofa.word, sofa.forms, sofa.source) == ("sofa", ("sofa",), "user")
    assert cats.forms == ("cats", "cat")
    with pytest.raises(InputError, match=r"mention 'sofas'.*closest words it knows: sofa"):
        guidance.user_words(["sofas"])
    with pytest.raises(InputError, match="one word per mention"):
        guidance.user_words(["hot dog"])
    with pytest.raises(InputError, match="no word '<end>'"):
        guidance.user_words(["<end>"])
    label = GuideWord("cat", ("cat", "cats"), "label", "tabby", 0.9)
    assert guidance.combine([label], [cats]) == [cats]  # the user already asks for it
    assert guidance.combine([label], [sofa]) == [sofa, label]
    ids = guidance.vocab.id
    assert guidance.constraints([sofa, label]) == [{ids("sofa")}, {ids("cat"), ids("cats")}]
    assert positions(["a", "cat", "on", "a", "sofa"], [sofa, label]) == [4, 1]


def test_a_word_repeated_or_in_both_numbers_is_one_mention():
    guidance = Guidance(vocabulary("sofa", "cat", "cats", "dog", "cup", "tea", "bed"))
    assert [w.word for w in guidance.user_words(["cat"] * 50 + ["Cats", "sofa", "cat"])] == ["cat", "sofa"]
    assert len(guidance.user_words(["cat", "dog", "cup", "tea"] * 3)) == 4
    with pytest.raises(InputError, match="at most 4 different words"):
        guidance.user_words(["cat", "dog", "cup", "tea", "bed"])


@pytest.mark.parametrize("mention", ["x" * 8192, "two " * 2048])
def test_an_error_about_a_huge_mention_does_not_echo_it(mention):
    with pytest.raises(InputError) as error:
        Guidance(vocabulary("cat")).user_words([mention])
    assert len(str(error.value)) < 200 and f"{mention[:40]!r}... (8192 characters)" in str(error.value)


def test_label_head_on_the_grid_is_torchvisions_resnet_classifier():
    from show_attend_tell.config import ModelConfig
    from show_attend_tell.model import Encoder
    from show_attend_tell.weights import ENCODER_WEIGHTS

    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    resnet = ENCODER_WEIGHTS["resnet50"].build()
    encoder = Encoder(ModelConfig(vocab_size=10, image_size=224, grid_size=7)).eval()
    with torch.no_grad():
        expected = resnet(images).softmax(dim=1)
        found = LabelHead.for_encoder("resnet50")(encoder(images))
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(int8=False)


@pytest.mark.slow  # the shipped model's 448 px encoder
def test_labels_make_the_shipped_model_name_the_cat_and_the_coffee(captioner):
    # the decoder guided to the labels' words (templates off: the coffee's would say "cup" whatever it wrote)
    guided = captioner.caption_batch([EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg"], templates=False)
    assert not any(caption.template for caption in guided)
    plain = captioner.caption_batch([EXAMPLES / "chelsea.jpg", EXAMPLES / "coffee.jpg"], guide=False)
    assert "cat" not in plain[0].words and not {"coffee", "cup", "mug"} & set(plain[1].words)
    cat, coffee = guided
    assert "cat" in cat.words and cat.guidance[0].label == "Egyptian cat" and cat.guidance[0].probability > 0.5
    assert cat.words[cat.guided_positions[0]] == "cat"
    assert {"coffee", "cup", "mug"} & set(coffee.words) and coffee.guidance[0].label == "espresso"
    assert cat.attention.shape == (len(cat.words), captioner.grid_size, captioner.grid_size)


@pytest.mark.slow
def test_a_confident_still_life_gets_its_template_read_by_the_decoder(captioner, capsys):
    coffee, cat = captioner.caption_batch([EXAMPLES / "coffee.jpg", EXAMPLES / "chelsea.jpg"])
    decoded = captioner.caption(EXAMPLES / "coffee.jpg", templates=False)
    assert coffee.template and coffee.text == "a cup of coffee on a table"
    (guide,) = coffee.guidance
    assert guide.label == "espresso" and guide.probability >= captioner.guidance.template_threshold
    assert coffee.words[coffee.guided_positions[0]] == "cup"
    # the decoder's own (guided) caption is the first alternative, and every template word has its map
    assert not decoded.template and coffee.alternatives[0].text == decoded.text
    g = captioner.grid_size
    assert coffee.attention.shape == (len(coffee.words), g, g)
    np.testing.assert_allclose(coffee.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert coffee.log_prob < decoded.log_prob  # the decoder would not have written it
    assert not cat.template and "cat" in cat.words  # no template for cats: the guided decoder's caption
    greedy = captioner.caption(EXAMPLES / "coffee.jpg", beam_size=1)  # ranks nothing: the score is the log p
    assert greedy.template and greedy.score == greedy.log_prob and len(greedy.alternatives) == 1
    # the user's words, no guidance or no templates: the decoder writes
    assert not captioner.caption(EXAMPLES / "coffee.jpg", mentions=["table"]).template
    assert not captioner.caption(EXAMPLES / "coffee.jpg", guide=False).template
    assert main(["caption", str(EXAMPLES / "coffee.jpg"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["template"] and record["caption"] == coffee.text and record["guidance"][0]["position"] == 1
    assert main(["caption", str(EXAMPLES / "coffee.jpg"), "--template-threshold", "0.95"]) == 0
    assert "[guided: coffee (label espresso" in capsys.readouterr().out  # 0.88 is below it
    assert main(["caption", str(EXAMPLES / "coffee.jpg")]) == 0
    assert "a cup of coffee on a table\t[template: coffee (label espresso" in capsys.readouterr().out


@pytest.mark.slow
def test_the_users_words_guide_every_photo_and_unknown_ones_stop_the_cli(captioner, capsys):
    result = captioner.caption(EXAMPLES / "chelsea.jpg", mentions=["sofa"], beam_size=3)
    assert "sofa" in result.words and result.guidance[0].source == "user"
    assert [w.word for w in result.guidance] == ["sofa", "cat"]  # the user's word, then the label's
    assert main(["caption", str(EXAMPLES / "chelsea.jpg"), "--mention", "sofaa"]) == 2
    assert "closest words it knows: sofa" in capsys.readouterr().err
    assert main(["caption", str(EXAMPLES / "rocket.jpg"), "--mention", "grass", "--no-guidance", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    (entry,) = record["guidance"]
    assert entry["word"] == "grass" and entry["source"] == "user"
    assert record["words"][entry["position"]] == "grass"


def test_shipped_model_has_the_everyday_words():
    vocab = json.loads((SHIPPED_MODEL / "vocab.json").read_text())["words"]
    usable = Guidance(Vocabulary(vocab)).concepts
    assert {"cat", "dog", "coffee", "pizza", "bus", "train", "kitchen", "bathroom", "couch"} <= {c.word for c in usable}
    templates = {c["word"] for c in json.loads(LABEL_WORDS.read_text())["concepts"] if "template" in c}
    assert {c.word for c in usable if c.template} == templates  # it can write every template


def detections(*pairs: tuple[str, float]):
    from show_attend_tell.detector import Detection

    return [Detection(name, score, (0.0, 0.0, 10.0, 10.0)) for name, score in pairs]


PLAN_WORDS = ("a", "man", "people", "dog", "dogs", "cat", "horse", "table", "bench", "giraffe", "frisbee")


def test_a_plan_names_confident_detections_and_discourages_what_nothing_saw():
    guidance = Guidance(
        vocabulary(*PLAN_WORDS),
        detection_threshold=0.5,
        presence_threshold=0.2,
        person_penalty=3.0,
        object_penalty=1.5,
    )
    vocab = guidance.vocab
    plans = guidance.plan(3, detections=[detections(("frisbee", 0.7), ("dog", 0.3)), detections(("person", 0.25)), []])
    first = plans[0]
    assert [(w.word, w.source, w.label) for w in first.guides] == [("frisbee", "detector", "frisbee")]
    assert first.penalties[vocab.id("man")] == first.penalties[vocab.id("people")] == -3.0  # no person seen
    assert first.penalties[vocab.id("table")] == -1.5 and vocab.id("dog") not in first.penalties  # a dog is there
    assert vocab.id("frisbee") not in first.penalties and vocab.id("a") not in first.penalties
    assert "person" in first.discouraged and "dog" not in first.discouraged
    assert [d.name for d in first.detections] == ["frisbee", "dog"]
    second = plans[1]
    assert second.guides == [] and vocab.id("man") not in second.penalties  # people seen: named freely
    assert set(guidance.plan(1, detections=None)[0].penalties) == set()  # no detector, nothing known to be absent
    matrix = guidance.penalty_matrix(plans)
    assert matrix.shape == (3, len(vocab)) and matrix[0, vocab.id("man")] == -3.0 and matrix[1].min() == -1.5
    assert guidance.penalty_matrix(guidance.plan(2)) is None


def test_detector_words_merge_with_labels_and_defer_to_their_animal():
    guidance = Guidance(vocabulary(*PLAN_WORDS), threshold=0.3, detection_threshold=0.4, max_detection_words=2)
    probabilities = torch.zeros(2, 1000)
    probabilities[:, 285] = 0.9  # Egyptian cat
    plans = guidance.plan(
        2,
        class_probabilities=probabilities,
        detections=[detections(("dog", 0.45), ("bench", 0.5)), detections(("cat", 0.6))],
    )
    # the detector's dog is not taken as seen where ImageNet says cat; the bench is named
    assert [(w.word, w.source) for w in plans[0].guides] == [("cat", "label"), ("bench", "detector")]
    assert guidance.vocab.id("dog") in plans[0].penalties
    assert [(w.word, w.source) for w in plans[1].guides] == [("cat", "label")]  # one constraint per concept
    users = guidance.user_words(["dog"])
    assert [w.source for w in guidance.plan(1, detections=[detections(("dog", 0.9))], users=users)[0].guides] == [
        "user"
    ]


def test_new_words_are_banned_unless_a_guide_word_asks_for_them():
    guidance = Guidance(vocabulary(*PLAN_WORDS), detection_threshold=0.4, new_words=["giraffe", "zebra"])
    assert guidance.new_words == ("giraffe",)  # a word the vocabulary lacks is no new word of this model
    giraffe = guidance.vocab.id("giraffe")
    unseen, seen = guidance.plan(2, detections=[[], detections(("giraffe", 0.8))])
    assert unseen.penalties[giraffe] == float("-inf")
    assert giraffe not in seen.penalties and seen.guides[0].forms == ("giraffe",)
    assert guidance.plan(1)[0].penalties == {giraffe: float("-inf")}  # banned with no detector at all


def test_new_words_start_as_copies_of_their_known_words():
    from conftest import tiny_decoder_config

    from show_attend_tell.model import CaptionDecoder
    from show_attend_tell.new_words import add_words, missing_words

    vocab = vocabulary(*[f"w{i}" for i in range(11)])  # 15 ids, as the tiny decoder's vocabulary
    torch.manual_seed(0)
    decoder = CaptionDecoder(tiny_decoder_config()).eval()
    pairs = missing_words(vocab, {"giraffe": "w3", "w4": "w5", "zebra": "unknown"})
    assert pairs == {"giraffe": "w3"}
    features = torch.randn(2, 4, 8)
    encoded = decoder.encode(features)
    words = torch.tensor([vocab.id("w3"), vocab.id("w7")])
    before, _, _ = decoder.step(words, decoder.init_state(encoded), encoded)
    grown = add_words(decoder, vocab, pairs)
    giraffe = grown.id("giraffe")
    assert giraffe == len(vocab) and grown.words[: len(vocab)] == vocab.words
    after, _, _ = decoder.step(words, decoder.init_state(encoded), encoded)
    assert after.shape == (2, len(vocab) + 1)
    assert torch.allclose(after[:, giraffe], after[:, vocab.id("w3")])  # the same logit as its known word
    # the other words keep their logits: log p only shifts by the renormalisation over one more word
    shift = (before - after[:, : len(vocab)])[:, :1]
    assert torch.allclose(before - after[:, : len(vocab)], shift.expand_as(before), atol=1e-5)
    giraffe_step, _, _ = decoder.step(torch.tensor([giraffe, giraffe]), decoder.init_state(encoded), encoded)
    w3_step, _, _ = decoder.step(torch.tensor([vocab.id("w3")] * 2), decoder.init_state(encoded), encoded)
    assert torch.allclose(giraffe_step, w3_step)  # reading the new word is reading its known word


COUNT_WORDS = (
    "a",
    "man",
    "men",
    "people",
    "two",
    "group",
    "crowd",
    "three",
    "table",
    "dog",
    "cup",
    "of",
    "coffee",
    "on",
)


def test_counted_people_ask_for_two_or_a_group_at_the_count_threshold():
    guidance = Guidance(vocabulary(*COUNT_WORDS), threshold=None, detection_threshold=0.4, count_threshold=0.3)
    people = [("person", 0.8), ("person", 0.35), ("person", 0.31), ("person", 0.25)]
    plans = guidance.plan(
        5,
        detections=[
            detections(*people[:1], *people[3:]),  # one at the threshold: nothing to count
            detections(
                people[0], ("dog", 0.6), *people[1:2], *people[3:]
            ),  # two, the one below the threshold not counted
            detections(*people),  # three
            [],
            detections(("person", 0.29), ("person", 0.29)),  # both below the threshold
        ],
    )
    assert plans[0].guides == [] and plans[3].guides == [] and plans[4].guides == []
    two = plans[1].guides
    assert [(w.word, w.source, w.label, w.probability) for w in two] == [
        ("dog", "detector", "dog", 0.6),
        ("two", "detector", "person", 0.35),
    ]
    assert two[1].forms == ("two",)  # the vocabulary has no "couple"
    assert two[1].as_dict() == {
        "word": "two",
        "forms": ["two"],
        "source": "detector",
        "label": "person",
        "probability": 0.35,
    }
    many = plans[2].guides[0]
    assert (many.word, many.forms, many.probability) == ("people", ("people", "group", "crowd", "three"), 0.31)
    vocab = guidance.vocab
    assert vocab.id("people") not in plans[2].penalties and vocab.id("man") not in plans[2].penalties
    assert guidance.lowest_presence == 0.15  # the detector is asked for what the presence thresholds need
    assert Guidance(guidance.vocab, count_threshold=0.1).lowest_presence == 0.1  # and for every person counted


def test_people_are_not_counted_when_counting_is_off_or_nothing_detected():
    off = Guidance(vocabulary(*COUNT_WORDS), threshold=None, count_threshold=None)
    assert off.plan(1, detections=[detections(("person", 0.9), ("person", 0.9))])[0].guides == []
    on = Guidance(vocabulary(*COUNT_WORDS), threshold=None, count_threshold=0.3)
    assert on.plan(1)[0].guides == []  # no detector ran
    assert on.count_words(detections(("person", 0.9), ("dog", 0.9))) == []  # one person, another class
    with pytest.raises(InputError):
        Guidance(vocabulary(*COUNT_WORDS), count_threshold=float("nan"))


def test_a_count_the_user_or_a_template_already_gives_is_not_asked_twice():
    guidance = Guidance(vocabulary(*COUNT_WORDS), threshold=0.3, template_threshold=0.4, count_threshold=0.3)
    two = detections(("person", 0.9), ("person", 0.8))
    users = guidance.user_words(["two"])
    assert [(w.word, w.source) for w in guidance.plan(1, detections=[two], users=users)[0].guides] == [("two", "user")]
    users = guidance.user_words(["crowd", "dog"])
    three = detections(("person", 0.9), ("person", 0.8), ("person", 0.7))
    planned = guidance.plan(1, detections=[three], users=users)[0]
    assert [(w.word, w.source) for w in planned.guides] == [("crowd", "user"), ("dog", "user")]  # "crowd" counts
    users = guidance.user_words(["table"])
    planned = guidance.plan(1, detections=[two], users=users)[0]
    assert [(w.word, w.source) for w in planned.guides] == [("table", "user"), ("two", "detector")]
    probabilities = torch.zeros(1, 1000)
    probabilities[0, 967] = 0.9  # espresso: the coffee template
    planned = guidance.plan(1, class_probabilities=probabilities, detections=[two])[0]
    assert " ".join(planned.template.words) == "a cup of coffee on a table"  # the template is still the caption
    assert [(w.word, w.source) for w in planned.guides] == [("coffee", "label"), ("two", "detector")]


def test_the_tuning_recipe_buckets_counted_people_with_and_without_suppressing_overlaps():
    recipe = load_script("recipes/tune_detector.py")
    from show_attend_tell.detector import Detection

    twice = [Detection("person", 0.5, (0, 0, 10, 10)), Detection("person", 0.4, (1, 0, 11, 10))]  # one person, twice
    apart = [Detection("person", 0.5, (0, 0, 10, 10)), Detection("person", 0.2, (20, 0, 30, 10))]
    rows = recipe.count_buckets([twice, apart], [1, 2], [0.3])
    plain, suppressed = rows
    assert plain["confusion"] == {"1->2": 1, "2->1": 1} and plain["right"] == 0
    assert suppressed["suppress_overlaps"] and suppressed["confusion"] == {"1->1": 1, "2->1": 1}
    assert suppressed["right"] == 1 and suppressed["right_of_two_or_more"] == 0
