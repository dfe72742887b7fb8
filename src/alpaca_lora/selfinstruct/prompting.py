"""The self-instruct prompts (numbered lists of example tasks to continue) and the parsers of their answers.

``method="alpaca"`` follows Stanford Alpaca's layout: the requirements, then the example tasks as
``### / N. Instruction: / N. Input: / N. Output:`` blocks, ending with the number of the first new task,
so that any model (base or chat, local or served) continues the list. ``method="two_step"`` follows the
Self-Instruct paper's first step: a plain list of instructions (``Task N: ...``) to continue; each new
instruction is then answered on its own, as an Alpaca prompt or a chat message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alpaca_lora.selfinstruct.seeds import Task

NO_INPUT = "<noinput>"
"""What the prompt shows for an empty input; read back as ``""``."""

TASKS_PER_PROMPT = 20
"""How many tasks the list asks for in all, examples included."""

_REQUIREMENTS = """You are asked to come up with a set of {total} diverse task instructions. These task instructions \
will be given to a language model, and the model's answers will be evaluated.

Here are the requirements:
1. Do not repeat a verb across instructions, so that the tasks are diverse.
2. Vary the wording: combine questions with imperative instructions.
3. Vary the kind of task: open-ended generation, classification, editing, brainstorming, rewriting, \
question answering, reasoning and so on.
4. A language model must be able to complete the instruction with text alone: no task may ask to see, hear, \
draw or output an image, audio, video or file, nor to act in the world (set an alarm, send an email).
5. Write the instructions in English, in one or two sentences each, imperative or interrogative.
6. Write an input for the instruction when it needs one: a specific example made up for the task, of at most \
100 words, never a placeholder. When the instruction needs no input, write "{no_input}".
7. Write an output that is a fitting answer to the instruction and input, of at most 100 words.

List of {total} tasks:
"""

# "3. Instruction:", "3 . Input:", "12.Output:" - the labels of one task block
_LABEL = re.compile(r"(\d+)\s*\.\s*(Instruction|Input|Output)\s*:", re.IGNORECASE)


def prompt_body(examples: list[Task]) -> str:
    """The prompt up to, not including, the next task's number: requirements and the example tasks."""
    text = _REQUIREMENTS.format(total=TASKS_PER_PROMPT, no_input=NO_INPUT)
    for number, task in enumerate(examples, 1):
        text += (f"###\n{number}. Instruction: {task.instruction}\n{number}. Input:\n{task.input or NO_INPUT}\n"
                 f"{number}. Output:\n{task.output}\n")
    return text + "###\n"


def prompt_header(examples: list[Task]) -> str:
    """The line that ends the prompt: the first new task's number and ``Instruction:``."""
    return f"{len(examples) + 1}. Instruction:"


@dataclass(frozen=True)
class Parsed:
    """One task block of a teacher's answer, parsed.

    Attributes:
        task: The task, or None when the block could not be read.
        text: The block as the teacher wrote it (for the report).
        complete: False for the last block of an answer cut at the token limit.

    """

    task: Task | None
    text: str
    complete: bool = True


def parse_answer(answer: str, first_number: int, cut: bool) -> list[Parsed]:
    """Split a teacher's answer into task blocks and read each.

    Args:
        answer: The text after the prompt; it continues task ``first_number`` (the prompt ended with
            ``"{first_number}. Instruction:"``). A chat model that repeats the header is read as well.
        first_number: The number of the first new task.
        cut: The answer stopped at the token limit, so its last block may be unfinished.

    Returns:
        One :class:`Parsed` per block: a block is read when it holds, in order, an instruction, an input and an
        output label of one number; past the last wanted task (``TASKS_PER_PROMPT``) nothing is read.

    """
    text = answer if _LABEL.match(answer.lstrip()) else f"{first_number}. Instruction:{answer}"
    blocks = [b for b in text.split("###") if b.strip()]
    out = []
    for i, block in enumerate(blocks):
        task = _read_block(block)
        if task is not None and task[0] > TASKS_PER_PROMPT:
            break
        out.append(Parsed(task[1] if task else None, block.strip(), complete=not (cut and i == len(blocks) - 1)))
    return out


def _read_block(block: str) -> tuple[int, Task] | None:
    parts = _LABEL.split(block.strip())
    # ['', '4', 'Instruction', ' text', '4', 'Input', 'text', '4', 'Output', 'text']
    if len(parts) != 10 or parts[0].strip():
        return None
    numbers, labels = parts[1::3], [p.lower() for p in parts[2::3]]
    if labels != ["instruction", "input", "output"] or len(set(numbers)) != 1:
        return None
    instruction, given, output = (" ".join(p.split()) if k == 0 else p.strip() for k, p in enumerate(parts[3::3]))
    given = "" if given.lower() in (NO_INPUT, "<no input>", "none", "n/a") else given
    return int(numbers[0]), Task(instruction, given, output)


def instructions_body(examples: list[Task]) -> str:
    """The two-step method's first prompt, up to the next task's number: a list of the example instructions."""
    return "Come up with a series of tasks:\n\n" + "".join(f"Task {n}: {t.instruction}\n"
                                                          for n, t in enumerate(examples, 1))


def instructions_header(examples: list[Task]) -> str:
    """The line that ends the two-step method's first prompt: ``Task N:``."""
    return f"Task {len(examples) + 1}:"


def parse_instructions(answer: str, first_number: int, cut: bool) -> list[Parsed]:
    """Split an answer to :func:`instructions_body` into instructions (tasks with no input or output yet).

    The answer continues ``Task {first_number}:``; each ``Task N:`` line starts the next instruction, whose
    lines are joined. An empty one is unparseable; past ``TASKS_PER_PROMPT`` nothing is read; the last one of an
    answer cut at the token limit is incomplete.
    """
    pieces = re.split(r"^\s*Task\s+(\d+)\s*:", f"Task {first_number}:{answer}", flags=re.MULTILINE)
    out = []
    for i in range(1, len(pieces) - 1, 2):
        if int(pieces[i]) > TASKS_PER_PROMPT:
            break
        text = " ".join(pieces[i + 1].split())
        out.append(Parsed(Task(text, "", "") if text else None, pieces[i + 1].strip(),
                          complete=not (cut and i == len(pieces) - 2)))
    return out


def answer_prompt(instruction: str, api: str) -> tuple[str, str]:
    """The two-step method's second prompt, ``(body, header)``.

    For a chat model the instruction alone; else the instruction rendered with the ``alpaca`` template,
    whose ``### Response:`` line is the header.
    """
    from alpaca_lora.data.prompts import get_template

    if api == "chat":
        return instruction, ""
    template = get_template("alpaca")
    text = template.render(instruction)
    cut = text.rindex(template.response_split)
    return text[:cut], text[cut:]


def answer_text(reply: str) -> str:
    """A reply to :func:`answer_prompt` up to its first ``###`` line, stripped.

    A model may write on into the next section of the template (``### Instruction:``, another
    ``### Response:``); that is not part of its answer.
    """
    return re.split(r"^\s*###", reply, maxsplit=1, flags=re.MULTILINE)[0].strip()
