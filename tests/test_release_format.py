"""The release's prompt and observation strings, byte for byte (docs/spec.md §2, §3, §10), and the compact
style (the toy's) unchanged. The expected texts are written out here literally, copied from the release's
prepare_lamra_train.py / prepare_lamra_train_500.py / v_retrver.py, independently of task.py's constants."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

import task
import tools

# a sample window: query image + text, candidate 1 with image and text, candidate 2 image only
SAMPLE = dict(query_text="a dog on a red sofa", has_query_image=True, instruction="find an image that matches",
              cand_texts=["  a brown dog \r", ""], cand_has_image=[True, True])

CROP_LINE = ('{"type": "function", "function": {"name": "crop_image", "description": "Zoom in on the image based on '
             'the bounding box coordinates.", "parameters": {"type": "object", "properties": {"bbox_2d": {"type": '
             '"array", "description": "coordinates for bounding box of the area you want to zoom in. minimum value is '
             '0 and maximum value is the width/height of the image.", "items": {"type": "number"}}, "target_image": '
             '{"type": "number", "description": "The index of the image to crop. Index from 1 to the number of '
             'images. Choose 1 to operate on original image."}}, "required": ["bbox_2d", "target_image"]}}')

RELEASE_SYSTEM = """You are a helpful assistant for multimodal retrieval tasks.

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
""" + CROP_LINE + """
{"type": "function", "function": {"name": "select_images", "description": "Select exactly one candidate image for detailed analysis from the provided candidate list.", "parameters": {"type": "object", "properties": {"target_images": {"type": "array", "description": "List containing exactly one candidate image index to select for detailed analysis (e.g., [3] to select candidate 3).", "items": {"type": "integer", "description": "Candidate image index from 1 to the number of candidates."}, "minItems": 1, "maxItems": 1}}, "required": ["target_images"]}}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""  # noqa: E501

RELEASE_USER = """Query:<image>Find an image that matches. a dog on a red sofa.Candidates:(1) <image>A brown dog.(2) <image>

Guidelines: You are given a query (which can be text, image, or both) and multiple candidate items (which can be text, image, or both). Your task is to evaluate each candidate against the query and select the best match. Determine if it is beneficial to employ the given visual operations (tools). You can use the following tools:
1. `crop_image`: Zoom in on specific areas of the query image or selected candidate images for detailed analysis
2. `select_images`: Select specific candidate images from the provided list for detailed comparison

Analyze the visual and textual features step by step and provide your final answer in the format:
<think>Your reasoning process here</think><answer>Directly answer with the most matching number</answer>"""  # noqa: E501

# lines that end in a space are written with an explicit "\n" so no editor can strip it
RELEASE_500_SYSTEM = ("""You are a helpful assistant for multimodal retrieval tasks. Your goal is to evaluate a query (which can be text, image, or both) against multiple candidate items (which can be text, image, or both) and select the best matching candidate.

## Step-by-Step Analysis Process
1. **Analyze All Text and Image Content**:""" + " \n" + """First, thoroughly examine the textual and visual features of the query and each candidate. For text, read and understand the content, context, and key points. For images, observe objects, colors, layout, and any relevant details.
Compare the query to each candidate individually, noting similarities and differences.

2. **Assess Analysis Difficulty**:
Identify if any candidate image has areas that are hard to analyze due to small size, blurriness, or complex details. This may require using `crop_image` to zoom in for a closer look.
If multiple candidates are similarly matching or difficult to distinguish, consider using `select_images` to focus on a subset for detailed comparison.

3. **Decide on Tool Usage**:
Use `crop_image` only if zooming in on a specific image region would provide critical information not available in the initial view. This tool is best for single images with high analysis difficulty.
Use `select_images` only if you need to narrow down candidates for in-depth analysis, such as when visual features are subtle or multiple images require side-by-side inspection.
Tools should be employed sparingly; only when they significantly enhance your ability to evaluate the match.

4. **Perform Final Evaluation**:
After any tool usage, integrate the new insights into your analysis.
Select the candidate that best matches the query based on all available information.

## Tools""" + " \n" + """You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
""" + CROP_LINE + """
{"type": "function", "function": {"name": "select_images", "description": "Select specific candidate images for detailed analysis from the provided candidate list.", "parameters": {"type": "object", "properties": {"target_images": {"type": "array", "description": "List of candidate image indices to select for detailed analysis (e.g., [1, 3, 5] to select candidates 1, 3, and 5).", "items": {"type": "integer", "description": "Candidate image index from 1 to the number of candidates."}}}, "required": ["target_images"]}}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>\"\"

""")  # noqa: E501

RELEASE_500_USER = """Query:<image>Find an image that matches. a dog on a red sofa.Candidates:(1) <image>A brown dog.(2) <image>

Guidelines:Always begin by analyzing the query and all candidates in detail, covering both text and image components.
Use tools only when analysis is challenging and additional visual inspection would lead to a more accurate match.
After analysis, provide your reasoning in <think> tags and the final answer in <answer> tags. The answer should be the only number index of the most matching candidate (e.g., <think>Your reasoning process here</think><answer>1</answer>).
"""  # noqa: E501


def sharegpt(style, use_tools=True, **kw):
    args = {**SAMPLE, **kw}
    messages = task.build_messages(args["query_text"], args["has_query_image"], args["instruction"], args["cand_texts"],
                                   args["cand_has_image"], use_tools, style=style)
    return [t["value"] for t in task.to_sharegpt(messages)]


@pytest.mark.parametrize("style, system, user", [("release", RELEASE_SYSTEM, RELEASE_USER),
                                                 ("release_500", RELEASE_500_SYSTEM, RELEASE_500_USER)])
def test_release_prompts_byte_for_byte(style, system, user):
    assert sharegpt(style) == [system, user]
    lines = system.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert lines[0] == CROP_LINE and json.loads(CROP_LINE + "}")["function"]["name"] == "crop_image"  # the release's
    assert json.loads(lines[1])["function"]["name"] == "select_images"                            # missing brace


def test_release_is_the_default():
    messages = task.build_messages("q", False, "", ["x"], [True], True)
    assert messages[0]["content"] == RELEASE_SYSTEM
    assert task.to_sharegpt(messages)[1]["value"].startswith("Query:Q.Candidates:(1) <image>X.\n\nGuidelines: You")


def test_release_layout_without_images_or_texts():
    user = sharegpt("release", has_query_image=False, instruction="", cand_texts=["a cat", "b"],
                    cand_has_image=[False, True])[1]
    assert user.startswith("Query:A dog on a red sofa.Candidates:(1) A cat.(2) <image>B.\n\nGuidelines: ")
    user = sharegpt("release", query_text="", instruction="Retrieve a similar image.", cand_texts=["", ""])[1]
    assert user.startswith("Query:<image>Retrieve a similar image.Candidates:(1) <image>(2) <image>\n\nGuidelines: ")


@pytest.mark.parametrize("text, formatted", [
    ("a red bus", "A red bus."), ("  A red bus.  ", "A red bus."), ("is it red?", "Is it red?"), ("wow!", "Wow!"),
    ('"quoted text"', "Quoted text."), ("line\r\nbreak", "Line\nbreak."), ("", ""), (None, ""), ("   ", ""),
    ("3 cats", "3 cats."), ("éclair", "Éclair."), ('" spaced "', " spaced ."),
])
def test_lamra_format(text, formatted):
    assert task.lamra_format(text) == formatted


@pytest.mark.parametrize("style", ["release", "release_500"])
def test_release_without_tools_drops_the_tool_text(style):
    system, user = sharegpt(style, use_tools=False)
    assert system.startswith("You are a helpful assistant for multimodal retrieval tasks.")
    for tool_word in ("<tools>", "crop_image", "select_images", "Tools", "tools"):
        assert tool_word not in system + user
    assert user.endswith("</answer>") if style == "release" else user.endswith("<answer>1</answer>).\n")


# the compact style, as HEAD (0ae439a) wrote it before the styles existed: sha256 of json.dumps(messages,
# sort_keys=True) for three windows, recorded from that commit's task.build_messages
COMPACT_AT_HEAD = [
    (("a red disc", True, "Find it.", ["first text", ""], [True, False], True, 2),
     "9bb61798fbcfb85e08c0c48d51f6beda712272985c20d85edc6a390f59af5ee3"),
    (("a red disc", False, "", ["", ""], [True, True], False),
     "815986bcd8d5d8e157445a34743f3633c02a828f37b7bf26b1453d1d4b81353e"),
    (("q", False, "I.", ["x"] * 3, [True] * 3, True, 1),
     "3f1a038ebd72ce93983da4b472dfaa165e652e5b8e07b2d8e64eafd9d971ded9"),
]


@pytest.mark.parametrize("args, digest", COMPACT_AT_HEAD)
def test_compact_style_is_unchanged(args, digest):
    messages = task.build_messages(*args, style="compact")
    assert hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest() == digest


def test_compact_style_text():
    system, user = sharegpt("compact", instruction="Find it.", query_text="a red disc", cand_texts=["first text", ""],
                            cand_has_image=[True, False])
    assert system.startswith("You are a retrieval assistant. Given a query and numbered candidates, rank the ")
    assert system.endswith("</tool_call>\nAt most two tool calls in total, one per turn.")
    assert user == ("Query:<image>Find it. a red disc\nCandidates:(1) <image>first text(2) \n\nGuidelines: rank all "
                    "candidates from most to least relevant to the query. Think step by step inside <think></think>, "
                    "then give the full ranking as <answer>[i1, i2, ...]</answer>. Small details may be invisible at "
                    "this resolution: inspect them with the tools first.")


def test_window_prompt_carries_the_style():
    q = {"qid": "1:3", "query_txt": "a dog", "query_img_path": "q.png"}
    cands = [{"did": "1:1", "txt": "a cat", "img_path": "c.png"}]
    load = lambda p: Image.new("RGB", (56, 56))  # noqa: E731
    for style in tools.STYLES:
        prompt = task.window_prompt(q, cands, {"1": ["find it"]}, load, True, 784, 784, 28, style=style)
        assert prompt["style"] == style
        assert prompt["messages"] == task.build_messages("a dog", True, "find it", ["a cat"], [True], True, style=style)
    assert task.window_prompt(q, cands, {}, load, True, 784, 784, 28)["style"] == "release"
    with pytest.raises(ValueError, match="prompt_style='paper'"):
        task.build_messages("q", False, "", [""], [True], True, style="paper")


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_observation_texts():
    images = [None, Image.fromarray(np.zeros((90, 60, 3), np.uint8)), Image.new("RGB", (112, 112))]
    crop = call("crop_image", bbox_2d=[0, 0, 0.4, 0.4], target_image=2)
    for style in ("release", "release_500"):
        r = tools.execute_tool_call(crop, images, 3136, 12544, 28, style)
        assert r.content == [{"type": "text", "text": "Here is the cropped image. (Image Size: 56x56)\n"},
                             {"type": "image"}]  # the release's obs: "...(Image Size: WxH)\n<image>"
    r = tools.execute_tool_call(crop, images, 3136, 12544, 28, "compact")
    assert r.content[0]["text"] == "Here is the cropped image. (Image Size: 56x56)"
    r = tools.execute_tool_call(call("select_images", target_images=[2, 1]), images, 3136, 12544)
    assert "".join(p.get("text", "<image>") for p in r.content) == (
        "Here are the selected images for detailed analysis. (Image Size: 112x112, Numbered 1 to 2):<image><image>")
    with pytest.raises(ValueError, match="style='paper'"):
        tools.execute_tool_call(crop, images, 3136, 12544, 28, "paper")
