"""bAbI-style question answering hidden in long real text, in the manner of BABILong.

Kuratov et al., "BABILong: Testing the Limits of LLMs with Long Context Reasoning-in-a-Haystack", 2024, after the
bAbI tasks of Weston et al., 2015. Our own small story generator (people, places, objects):

- ``babi_qa1`` (one supporting fact): "Where is Mary?" after "Mary went to the kitchen."
- ``babi_qa2`` (two supporting facts): "Where is the apple?" after "John picked up the apple." and
  "John travelled to the garden."
- ``babi_qa3`` (three supporting facts): "Where was the apple before the garden?", the object's previous place.

The story's sentences keep their order and are scattered at random depths through real text (the embedded
corpus). Scored as classification over the places by the log-likelihood of each (chance = 1 / number of places).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from eval.tasks.base import Sample, Task
from eval.tasks.text import filler_chars, haystack_prompt, real_text

PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Alice", "Robert")
PLACES = ("kitchen", "garden", "hallway", "bedroom", "office", "bathroom")
OBJECTS = ("apple", "football", "milk", "book", "key", "umbrella")
MOVE_VERBS = ("went", "moved", "travelled", "journeyed")
TAKE_VERBS = ("picked up", "grabbed", "took")
DROP_VERBS = ("dropped", "put down", "left")

HEADER = "A short story is hidden in the text below. Read it and answer the question.\n\n"


@dataclass
class World:
    """The state a story builds up: where each person is, who holds what, and each object's places so far."""

    person_place: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    object_place: dict[str, str] = field(default_factory=dict)
    object_history: dict[str, list[str]] = field(default_factory=dict)
    # index of the fact that last decided each person's place / each object's holder
    last_move: dict[str, int] = field(default_factory=dict)
    last_take: dict[str, int] = field(default_factory=dict)

    def _visit(self, obj: str, place: str) -> None:
        history = self.object_history.setdefault(obj, [])
        if not history or history[-1] != place:
            history.append(place)
        self.object_place[obj] = place

    def move(self, person: str, place: str, index: int) -> None:
        self.person_place[person] = place
        self.last_move[person] = index
        for obj, who in self.holder.items():
            if who == person:
                self._visit(obj, place)

    def take(self, person: str, obj: str, index: int) -> None:
        self.holder[obj] = person
        self.last_take[obj] = index
        self._visit(obj, self.person_place[person])

    def drop(self, person: str, obj: str) -> None:
        del self.holder[obj]


def tell_story(rng: random.Random, num_facts: int, objects: bool) -> tuple[list[str], World]:
    """A random story of ``num_facts`` sentences (moves only, or moves and object handling) and its end state."""
    world = World()
    facts: list[str] = []
    people = rng.sample(PEOPLE, 4)
    while len(facts) < num_facts:
        person = rng.choice(people)
        located = person in world.person_place
        held = [o for o, who in world.holder.items() if who == person]
        free = [o for o in OBJECTS if o not in world.holder]
        action = rng.random()
        if objects and located and held and action < 0.15:
            obj = rng.choice(held)
            world.drop(person, obj)
            facts.append(f"{person} {rng.choice(DROP_VERBS)} the {obj}.")
        elif objects and located and free and action < 0.45:
            obj = rng.choice(free)
            world.take(person, obj, len(facts))
            facts.append(f"{person} {rng.choice(TAKE_VERBS)} the {obj}.")
        else:
            place = rng.choice([p for p in PLACES if p != world.person_place.get(person)])
            world.move(person, place, len(facts))
            facts.append(f"{person} {rng.choice(MOVE_VERBS)} to the {place}.")
    return facts, world


def make_question(
    rng: random.Random, supporting: int, num_facts: tuple[int, int] | None = None
) -> tuple[list[str], str, str]:
    """Story facts, a question needing ``supporting`` facts, and its answer (a place); retried until one exists.
    ``num_facts`` (lowest, highest) replaces the one-fact stories' 4-8 sentences (for training curricula)."""
    while True:
        if supporting == 1:
            facts, world = tell_story(rng, rng.randint(*(num_facts or (4, 8))), objects=False)
            person = rng.choice(sorted(world.person_place))
            return facts, f"Where is {person}?", world.person_place[person]
        facts, world = tell_story(rng, rng.randint(6, 10), objects=True)
        if supporting == 2:
            # held objects whose holder moved after taking them: the take and the move are both needed
            candidates = [
                o for o, who in world.holder.items() if world.last_move.get(who, -1) > world.last_take[o]
            ]
            if candidates:
                obj = rng.choice(sorted(candidates))
                return facts, f"Where is the {obj}?", world.object_place[obj]
        else:
            candidates = [o for o, h in world.object_history.items() if len(h) >= 2 and h[-1] not in h[:-1]]
            if candidates:
                obj = rng.choice(sorted(candidates))
                history = world.object_history[obj]
                return facts, f"Where was the {obj} before the {history[-1]}?", history[-2]


class BabiQA(Task):
    metric = "choice"
    paper = "Kuratov et al., 2024 (BABILong)"
    uses_real_text = True

    def __init__(self, supporting: int):
        if supporting not in (1, 2, 3):
            raise ValueError(f"supporting={supporting} must be 1, 2 or 3 (the bAbI tasks qa1, qa2, qa3)")
        self.supporting = supporting
        self.name = f"babi_qa{supporting}"

    def make_sample(self, tokenizer, length: int, variant: str, rng: random.Random) -> Sample:
        facts, question, answer = make_question(rng, self.supporting)
        depths = sorted(rng.random() for _ in facts)
        footer = f"\n\nQuestion: {question}\nAnswer:"
        hay = real_text(rng, filler_chars(tokenizer, length))
        prompt, meta = haystack_prompt(
            tokenizer, length, HEADER, footer, hay, list(zip(depths, facts)), self.name
        )
        choices = [f" {place}" for place in PLACES]
        return Sample(prompt, [f" {answer}"], length, variant, choices, {**meta, "question": question})
