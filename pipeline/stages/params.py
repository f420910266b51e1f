"""``params`` stage: total and active parameters per layer kind (the counter the budget loss uses)."""

from pipeline.model.params import count_model, format_count


def main(recipe, args) -> None:
    print(format_count(recipe.model, count_model(recipe.model)))
