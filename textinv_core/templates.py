"""Neutral prompt templates that carry the pseudo-word, as in the paper's LDM code.

`{}` stands for the word. Object templates describe a thing; style templates describe a manner.
Mixing them up is a known failure mode, so the set is chosen by name, never guessed.
"""

from __future__ import annotations

OBJECT = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)

STYLE = (
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}",
    "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)

# Per-image tokens ("a photo of S* with S_i"): the second slot names one training image.
OBJECT_WITH_IMAGE_TOKEN = (
    "a photo of a {} with {}", "a rendering of a {} with {}", "a cropped photo of the {} with {}",
    "the photo of a {} with {}", "a photo of a clean {} with {}", "a close-up photo of a {} with {}",
    "a bright photo of the {} with {}", "a good photo of the {} with {}", "a photo of one {} with {}",
)
STYLE_WITH_IMAGE_TOKEN = (
    "a painting in the style of {} with {}", "a rendering in the style of {} with {}",
    "a picture in the style of {} with {}", "a rendition in the style of {} with {}",
)

TEMPLATE_SETS = {"object": OBJECT, "style": STYLE}
IMAGE_TOKEN_SETS = {"object": OBJECT_WITH_IMAGE_TOKEN, "style": STYLE_WITH_IMAGE_TOKEN}
EVAL_TEMPLATE = {"object": "a photo of a {}", "style": "a painting in the style of {}"}


def fill_caption(caption: str, placeholder: str, name: str) -> str:
    """A user caption names the word as `{}`, `<name>` or `S*`; without one the word leads."""
    if "{}" in caption:
        return caption.replace("{}", placeholder)
    for form in (f"<{name}>", "S*"):
        if form in caption:
            return caption.replace(form, placeholder)
    return f"{placeholder}, {caption}" if caption.strip() else placeholder


def image_placeholder(name: str, index: int) -> str:
    """The per-image token of image `index` ("a photo of S* with S_i"): trained, never saved."""
    return f"<{name}-image-{index}>"


def training_prompt(config, image_index: int, template_index: int, image_tokens: bool = False) -> str:
    """The prompt y of one draw: the image's caption, or a neutral template of the config's set (with the
    image's own token when per-image tokens are on)."""
    if config.templates == "captions":
        return fill_caption(config.captions[image_index], config.placeholder, config.name)
    if image_tokens:
        templates = IMAGE_TOKEN_SETS[config.templates]
        return templates[template_index % len(templates)].format(config.placeholder,
                                                                 image_placeholder(config.name, image_index))
    templates = TEMPLATE_SETS[config.templates]
    return templates[template_index % len(templates)].format(config.placeholder)


def preview_prompt(config) -> str:
    """What previews show: the config's preview prompt, else the evaluation template, with the word."""
    template = config.preview_prompt or EVAL_TEMPLATE.get(config.templates, "a photo of a {}")
    return template.replace("{}", config.placeholder)
