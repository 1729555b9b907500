"""Fine-tuning tests. :data:`PROMPTS`: the prompts every tiny fine-tune here trains and evaluates on."""

PROMPTS = ["a red fox in snow", "waves at sunset", "a city street at night", "a cat on a sofa"]
