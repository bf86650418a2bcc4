"""Generate the zero-shot metadata JSONs next to this file (class names + prompt templates).

    pip install -r tests/references.txt   # open_clip, the ImageNet lists' source
    python clip_jax/assets/zero_shot/make_metadata.py [--clip-repo PATH]

Each <dataset>.json is {"classnames": [...], "templates": [...], "source": str,
"tfds_name": str, "tfds_label_key": str}: classnames[i] is the display name of tfds label i,
templates are format strings with "{}" where the class name goes.

Provenance:
  * ImageNet: open_clip.zero_shot_metadata (IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES),
    itself a copy of OpenAI's notebooks/Prompt_Engineering_for_ImageNet.ipynb (the CLIP paper's
    1000 cleaned class names in ILSVRC2012 class-index order, and its 80 templates).
  * The others: OpenAI CLIP repository data/prompts.md (the paper's class names and templates),
    put in the tfds label order. The *_LABELS lists below are the tfds label names (the
    datasets' own label files); CLIP's display name is the label with "_" -> " ", which
    --clip-repo checks against prompts.md. CLIP's own list order differs from tfds for
    food101 (cheese plate / cheesecake swapped) and oxford_iiit_pet (CLIP sorts
    case-sensitively, tfds label ids follow the dataset's list.txt), so do not use
    prompts.md's order with tfds labels.

--clip-repo PATH (a checkout of github.com/openai/CLIP) verifies every list and template
against data/prompts.md and the ImageNet notebook; if tensorflow_datasets is importable, the
food101 and oxford_iiit_pet labels (bundled in tfds) are checked too. The cifar10/cifar100/stl10
names are read by tfds from the downloaded archives (batches.meta.txt, fine_label_names.txt,
class_names.txt), so they cannot be checked offline; they equal prompts.md's order.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP_REPO = "OpenAI CLIP repository (github.com/openai/CLIP)"

CIFAR10_LABELS = [
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck',
]

CIFAR100_LABELS = [
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl',
    'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair',
    'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin',
    'elephant', 'flatfish', 'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp',
    'lawn_mower', 'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain',
    'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck',
    'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road',
    'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider',
    'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone', 'television', 'tiger',
    'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman',
    'worm',
]

STL10_LABELS = [
    'airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck',
]

FOOD101_LABELS = [
    'apple_pie', 'baby_back_ribs', 'baklava', 'beef_carpaccio', 'beef_tartare', 'beet_salad', 'beignets',
    'bibimbap', 'bread_pudding', 'breakfast_burrito', 'bruschetta', 'caesar_salad', 'cannoli',
    'caprese_salad', 'carrot_cake', 'ceviche', 'cheesecake', 'cheese_plate', 'chicken_curry',
    'chicken_quesadilla', 'chicken_wings', 'chocolate_cake', 'chocolate_mousse', 'churros', 'clam_chowder',
    'club_sandwich', 'crab_cakes', 'creme_brulee', 'croque_madame', 'cup_cakes', 'deviled_eggs', 'donuts',
    'dumplings', 'edamame', 'eggs_benedict', 'escargots', 'falafel', 'filet_mignon', 'fish_and_chips',
    'foie_gras', 'french_fries', 'french_onion_soup', 'french_toast', 'fried_calamari', 'fried_rice',
    'frozen_yogurt', 'garlic_bread', 'gnocchi', 'greek_salad', 'grilled_cheese_sandwich', 'grilled_salmon',
    'guacamole', 'gyoza', 'hamburger', 'hot_and_sour_soup', 'hot_dog', 'huevos_rancheros', 'hummus',
    'ice_cream', 'lasagna', 'lobster_bisque', 'lobster_roll_sandwich', 'macaroni_and_cheese', 'macarons',
    'miso_soup', 'mussels', 'nachos', 'omelette', 'onion_rings', 'oysters', 'pad_thai', 'paella', 'pancakes',
    'panna_cotta', 'peking_duck', 'pho', 'pizza', 'pork_chop', 'poutine', 'prime_rib', 'pulled_pork_sandwich',
    'ramen', 'ravioli', 'red_velvet_cake', 'risotto', 'samosa', 'sashimi', 'scallops', 'seaweed_salad',
    'shrimp_and_grits', 'spaghetti_bolognese', 'spaghetti_carbonara', 'spring_rolls', 'steak',
    'strawberry_shortcake', 'sushi', 'tacos', 'takoyaki', 'tiramisu', 'tuna_tartare', 'waffles',
]

OXFORD_IIIT_PET_LABELS = [
    'Abyssinian', 'american_bulldog', 'american_pit_bull_terrier', 'basset_hound', 'beagle', 'Bengal',
    'Birman', 'Bombay', 'boxer', 'British_Shorthair', 'chihuahua', 'Egyptian_Mau', 'english_cocker_spaniel',
    'english_setter', 'german_shorthaired', 'great_pyrenees', 'havanese', 'japanese_chin', 'keeshond',
    'leonberger', 'Maine_Coon', 'miniature_pinscher', 'newfoundland', 'Persian', 'pomeranian', 'pug',
    'Ragdoll', 'Russian_Blue', 'saint_bernard', 'samoyed', 'scottish_terrier', 'shiba_inu', 'Siamese',
    'Sphynx', 'staffordshire_bull_terrier', 'wheaten_terrier', 'yorkshire_terrier',
]

CIFAR_TEMPLATES = [
    'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
    'a low contrast photo of a {}.', 'a high contrast photo of a {}.',
    'a bad photo of a {}.', 'a good photo of a {}.', 'a photo of a small {}.',
    'a photo of a big {}.', 'a photo of the {}.', 'a blurry photo of the {}.',
    'a black and white photo of the {}.', 'a low contrast photo of the {}.',
    'a high contrast photo of the {}.', 'a bad photo of the {}.',
    'a good photo of the {}.', 'a photo of the small {}.', 'a photo of the big {}.',
]

STL10_TEMPLATES = ['a photo of a {}.', 'a photo of the {}.']
FOOD101_TEMPLATES = ['a photo of {}, a type of food.']
OXFORD_IIIT_PET_TEMPLATES = ['a photo of a {}, a type of pet.']

# dataset -> (tfds name, label key, tfds label names, templates, CLIP prompts.md section, source)
DATASETS = {
    "cifar10": ("cifar10", "label", CIFAR10_LABELS, CIFAR_TEMPLATES, "CIFAR10",
                f"CLIP paper; {CLIP_REPO} data/prompts.md (CIFAR10); label order of CIFAR-10 batches.meta.txt "
                "= tfds cifar10 'label'"),
    "cifar100": ("cifar100", "label", CIFAR100_LABELS, CIFAR_TEMPLATES, "CIFAR100",
                 f"CLIP paper; {CLIP_REPO} data/prompts.md (CIFAR100); fine-label order of CIFAR-100 "
                 "fine_label_names.txt = tfds cifar100 'label' (not 'coarse_label')"),
    "stl10": ("stl10", "label", STL10_LABELS, STL10_TEMPLATES, "STL10",
              f"CLIP paper; {CLIP_REPO} data/prompts.md (STL10); label order of STL-10 class_names.txt "
              "= tfds stl10 'label' (file labels 1..10 minus 1)"),
    "food101": ("food101", "label", FOOD101_LABELS, FOOD101_TEMPLATES, "Food101",
                f"CLIP paper; {CLIP_REPO} data/prompts.md (Food101) names, in tfds food101 'label' order "
                "(tfds food-101_classes.txt; CLIP's list swaps cheese plate/cheesecake)"),
    "oxford_iiit_pet": ("oxford_iiit_pet", "label", OXFORD_IIIT_PET_LABELS, OXFORD_IIIT_PET_TEMPLATES, "OxfordPets",
                        f"CLIP paper; {CLIP_REPO} data/prompts.md (OxfordPets) names, in tfds oxford_iiit_pet "
                        "'label' order (the dataset's list.txt class ids; CLIP's list is ordered differently)"),
}


def display(label: str) -> str:
    return label.replace("_", " ")


def imagenet() -> dict:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]  # open_clip stores them as lambdas
    return {
        "classnames": list(IMAGENET_CLASSNAMES),
        "templates": templates,
        "source": f"CLIP paper; {CLIP_REPO} notebooks/Prompt_Engineering_for_ImageNet.ipynb via "
                  "open_clip.zero_shot_metadata; ImageNet class order of ILSVRC2012 / tfds imagenet2012 'label'",
        "tfds_name": "imagenet2012",
        "tfds_label_key": "label",
    }


def build() -> dict[str, dict]:
    out = {"imagenet": imagenet()}
    for name, (tfds_name, key, labels, templates, _, source) in DATASETS.items():
        out[name] = {"classnames": [display(x) for x in labels], "templates": list(templates), "source": source,
                     "tfds_name": tfds_name, "tfds_label_key": key}
    return out


def check_clip_repo(data: dict, repo: str) -> None:
    with open(os.path.join(repo, "data", "prompts.md"), encoding="utf-8") as f:
        md = f.read()
    sections = {}
    for sec in re.split(r"^## ", md, flags=re.M)[1:]:
        code = re.search(r"```bash\n(.*?)```", sec, re.S).group(1)
        values = {m.group(1): ast.literal_eval(m.group(2)) for m in re.finditer(r"(\w+) = (\[.*?\n\])", code, re.S)}
        sections[sec.split("\n", 1)[0].strip()] = values
    for name, (_, _, _, _, section, _) in DATASETS.items():
        clip = sections[section]
        assert data[name]["templates"] == clip["templates"], name
        assert sorted(data[name]["classnames"]) == sorted(clip["classes"]), name
        if name in ("cifar10", "cifar100", "stl10"):
            assert data[name]["classnames"] == clip["classes"], name
    with open(os.path.join(repo, "notebooks", "Prompt_Engineering_for_ImageNet.ipynb"), encoding="utf-8") as f:
        nb = json.load(f)
    src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for key, var in (("classnames", "imagenet_classes"), ("templates", "imagenet_templates")):
        value = ast.literal_eval(re.search(var + r"\s*=\s*(\[.*?\])\n", src, re.S).group(1))
        assert data["imagenet"][key] == value, key
    print("matches", repo)


def check_tfds(data: dict) -> None:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        print("tensorflow_datasets not importable: tfds label names not checked")
        return
    for name in ("food101", "oxford_iiit_pet"):  # label names bundled with tfds
        names = tfds.builder(name).info.features["label"].names
        assert [display(x) for x in names] == data[name]["classnames"], name
    print("matches tfds", tfds.__version__)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-repo", help="checkout of github.com/openai/CLIP to verify against")
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args()
    data = build()
    assert len(data["imagenet"]["classnames"]) == 1000 and len(data["imagenet"]["templates"]) == 80
    assert len(data["cifar10"]["classnames"]) == 10 and len(data["cifar100"]["classnames"]) == 100
    assert len(data["food101"]["classnames"]) == 101 and len(data["oxford_iiit_pet"]["classnames"]) == 37
    for name, d in data.items():
        # CLIP's ImageNet names repeat two (missile: 657, 744; sunglasses: 836, 837), as published.
        assert len(set(d["classnames"])) == len(d["classnames"]) - (2 if name == "imagenet" else 0), name
        assert all(t.count("{}") == 1 for t in d["templates"]), name
    if args.clip_repo:
        check_clip_repo(data, args.clip_repo)
    check_tfds(data)
    for name, d in data.items():
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print("wrote", path, len(d["classnames"]), "classes", len(d["templates"]), "templates")


if __name__ == "__main__":
    main()
