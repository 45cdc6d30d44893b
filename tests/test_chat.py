"""The v15 chat format: exact token sequences built from the layout of docs/model.md 4, errors, output parsing.

Expected sequences are written from docs/model.md: literal special ids (docs/model.md 4 table) around the tiny
tokenizer's encodings of the text pieces (the tokenizer itself is checked in test_tokenizer.py).
"""

import numpy as np
import pytest
from PIL import Image

from mistral4_jax import InputError
from mistral4_jax.text.images import ImageConfig
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax.text.tokenizer import Tokenizer

BOS, EOS, INST, INST_END, TOOLS, TOOLS_END, RES, RES_END, CALLS = 1, 2, 3, 4, 5, 6, 7, 8, 9
IMG, IMG_BREAK, IMG_END, SYS, SYS_END, ARGS, THINK, THINK_END, SET, SET_END = 10, 12, 13, 17, 18, 32, 34, 35, 36, 37

# mistral-common tests/test_tokenizer_v15.py, EXPECTED_TEXT_V15: the decoded text of the same chat.
EXPECTED_TEXT_V15 = (
    '<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][AVAILABLE_TOOLS][{"type": "function", "function": {"name": '
    '"math_interpreter", "description": "Get the value of an arithmetic expression.", "parameters": {"type": '
    '"object", "properties": {"expression": {"type": "string", "description": "Math expression."}}}}}]'
    '[/AVAILABLE_TOOLS][MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS][INST]U1[/INST]A1'
    "[TOOL_CALLS]F1[ARGS]{}[TOOL_CALLS]F2[ARGS]{}</s>[TOOL_RESULTS]R1[/TOOL_RESULTS]"
    "[TOOL_RESULTS]R2[/TOOL_RESULTS]A2</s>[INST]U2[/INST]"
)
TOOLS_DEF = [{"type": "function", "function": {
    "name": "math_interpreter", "description": "Get the value of an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                   "description": "Math expression."}}}}}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tok")
    write_tekken(d, image_config=ImageConfig())
    return Tokenizer.from_pretrained(d)


def settings(tok, effort):
    return [SET, *tok.encode('{"reasoning_effort": "' + effort + '"}'), SET_END]


@pytest.mark.parametrize("effort", ["none", "high"])
def test_system_and_user(tok, effort):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    want = [BOS, SYS, *tok.encode("You are a helpful assistant."), SYS_END, *settings(tok, effort),
            INST, *tok.encode("What is the capital of France?"), INST_END]
    out = tok.apply_chat_template(msgs, reasoning_effort=effort)
    assert out.input_ids == want
    assert out.pixel_values is None and out.image_sizes is None
    if effort == "none":  # the default, and None means the same
        assert tok.apply_chat_template(msgs).input_ids == want
        assert tok.apply_chat_template(msgs, reasoning_effort=None).input_ids == want


def test_multi_turn_tool_call_and_result(tok):
    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1", "tool_calls": [
                {"id": "123456789", "type": "function", "function": {"name": "F1", "arguments": "{}"}},
                {"id": "999999999", "type": "function", "function": {"name": "F2", "arguments": {}}}]},
            {"role": "tool", "tool_call_id": "123456789", "content": "R1"},
            {"role": "tool", "tool_call_id": "999999999", "content": "R2"},
            {"role": "assistant", "content": "A2"},
            {"role": "user", "content": "U2"}]
    e = tok.encode
    tools_text = EXPECTED_TEXT_V15.split("[AVAILABLE_TOOLS]")[1].split("[/AVAILABLE_TOOLS]")[0]
    head = [BOS, SYS, *e("S"), SYS_END]
    want = [*head, TOOLS, *e(tools_text), TOOLS_END, *settings(tok, "high"), INST, *e("U1"), INST_END, *e("A1"),
            CALLS, *e("F1"), ARGS, *e("{}"), CALLS, *e("F2"), ARGS, *e("{}"), EOS,
            RES, *e("R1"), RES_END, RES, *e("R2"), RES_END, *e("A2"), EOS, INST, *e("U2"), INST_END]
    out = tok.apply_chat_template(msgs, reasoning_effort="high", tools=TOOLS_DEF)
    assert out.input_ids == want
    assert tok.decode(out.input_ids) == EXPECTED_TEXT_V15
    # Without tools the block is left out; settings stay right before the first user turn.
    no_tools = tok.apply_chat_template(msgs, reasoning_effort="high").input_ids
    assert no_tools == head + want[len(head) + len(e(tools_text)) + 2:]


def test_tool_call_arguments_json(tok):
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [
                {"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "n": 2}}},
                {"id": "c2", "function": {"name": "now", "arguments": ""}}]},  # empty arguments are {}
            {"role": "tool", "tool_call_id": "c2", "content": "noon"},  # results given out of call order
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = tok.apply_chat_template(msgs).input_ids
    tail = [INST, *tok.encode("Weather?"), INST_END, CALLS, *tok.encode("get_weather"), ARGS,
            *tok.encode('{"city": "Zürich", "n": 2}'), CALLS, *tok.encode("now"), ARGS, *tok.encode("{}"), EOS,
            RES, *tok.encode("sunny"), RES_END, RES, *tok.encode("noon"), RES_END]  # in call order
    assert out[-len(tail):] == tail


def test_runs_of_turns_and_parts_merge_as_mistral_common_does(tok):
    e = tok.encode
    img = Image.new("RGB", (4, 4), "red")
    msgs = [{"role": "user", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "wor"}, {"type": "text", "text": "ld"}]},
            {"role": "assistant", "content": "Hi "},
            {"role": "assistant", "content": [{"type": "text", "text": "there  "}]},
            {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "text", "text": " here"},
                                         {"type": "image", "image": img}]}]
    # user turns joined by "\n\n", parts by "": one text, encoded once; the assistant run likewise, then
    # right-stripped of spaces; texts followed by one image put the image first
    want = [BOS, *settings(tok, "none"), INST, *e("Hello\n\nworld"), INST_END, *e("Hi \n\nthere"), EOS,
            INST, IMG, IMG_END, *e("Look here"), INST_END]
    assert tok.apply_chat_template(msgs).input_ids == want


def test_system_prompt_alone_and_anywhere(tok):
    e = tok.encode
    assert tok.apply_chat_template([{"role": "system", "content": "S"}]).input_ids == [BOS, SYS, *e("S"), SYS_END]
    msgs = [{"role": "user", "content": "U"}, {"role": "system", "content": "S"}, {"role": "system", "content": "T"},
            {"role": "user", "content": "V"}]
    want = [BOS, *settings(tok, "none"), INST, *e("U"), INST_END, SYS, *e("S"), SYS_END, SYS, *e("T"), SYS_END,
            INST, *e("V"), INST_END]
    assert tok.apply_chat_template(msgs).input_ids == want


def test_think_parts_and_open_final_turn(tok):
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "add them"},
                                              {"type": "text", "text": "4"}]}]
    body = [INST, *tok.encode("2+2?"), INST_END, THINK, *tok.encode("add them"), THINK_END, *tok.encode("4")]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).input_ids[-len(body) - 1:] == body + [EOS]
    assert tok.apply_chat_template(msgs, continue_final_message=True).input_ids[-len(body):] == body


def _block(cols, rows):
    return ([IMG] * cols + [IMG_BREAK]) * (rows - 1) + [IMG] * cols + [IMG_END]


def test_two_images_in_one_user_turn(tok, tmp_path):
    big = np.full((768, 1024, 3), 200, np.uint8)           # 37 x 28 tokens, 1036 x 784 pixels
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "small.png")  # 11 x 8, 308 x 224
    msgs = [{"role": "user", "content": [{"type": "image", "image": big},
                                         {"type": "text", "text": "Compare these."},
                                         {"type": "image", "image": str(tmp_path / "small.png")}]}]
    out = tok.apply_chat_template(msgs)
    want = [BOS, *settings(tok, "none"), INST, *_block(37, 28), *tok.encode("Compare these."), *_block(11, 8), INST_END]
    assert out.input_ids == want
    assert out.input_ids.count(IMG) == 37 * 28 + 11 * 8
    assert out.pixel_values.shape == (2, 3, 784, 1036) and out.pixel_values.dtype == np.float32
    assert out.image_sizes.tolist() == [[784, 1036], [224, 308]]
    assert (out.pixel_values[1, :, 224:] == 0).all() and (out.pixel_values[1, :, :, 308:] == 0).all()


def test_single_text_then_image_puts_image_first(tok):
    # mistral-common's force_img_first (EXPECTED_TEXT_USER_IMAGE: "[INST][IMG][IMG_END]Here is content[/INST]")
    img = Image.new("RGB", (4, 4), "red")
    out = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Here is content"},
                                                                {"type": "image", "image": img}]}])
    assert out.input_ids == [BOS, *settings(tok, "none"), INST, IMG, IMG_END, *tok.encode("Here is content"), INST_END]


def test_tiny_model_image_config(tok):
    img = np.zeros((56, 84, 3), np.uint8)
    out = tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": img}]}],
                                  image_config=ImageConfig(112, 14, 2))
    assert out.input_ids.count(IMG) == 3 * 2 and out.pixel_values.shape == (1, 3, 56, 84)


@pytest.mark.parametrize("msgs,effort,match", [
    ([{"role": "bot", "content": "hi"}], "none", "unknown role 'bot'"),
    ([{"role": "user", "content": [{"type": "image", "image": "/no/such/file.png"}]}], "none",
     "cannot read image file '/no/such/file.png'"),
    ([{"role": "user", "content": "hi"}], "medium", "reasoning_effort must be one of"),
    ([{"role": "user", "content": "hi"}], "low", "reasoning_effort must be one of"),
    ([{"role": "user", "content": [{"type": "audio", "audio": 1}]}], "none", "part type 'audio'"),
    ([{"role": "assistant", "content": "a"}], "none", "one message must be a user or system turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f",
      "arguments": {}}}]}, {"role": "tool", "tool_call_id": "x", "content": "r"}], "none", r"tool_calls\[0\].id"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "x", "content": "r"}], "none",
     "must follow an assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "a", "function": {
        "name": "f", "arguments": {}}}]}, {"role": "tool", "tool_call_id": "b", "content": "r"}], "none",
     "answers no tool call"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "a", "function": {
        "name": "f", "arguments": {}}}]}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "?"}],
     "none", "1 ids but 0 results"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "a", "function": {
        "name": "no spaces", "arguments": {}}}]}], "none", "function.name must be 1 to 64"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "none", "tool_call_id must be"),
    ([{"role": "system", "content": [{"type": "thinking", "thinking": "t"}]}], "none", "part type 'thinking'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "none", "add_generation_prompt"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "?"}], "none",
     "needs content or tool_calls"),
    ([], "none", "non-empty list"),
])
def test_errors(tok, msgs, effort, match):
    with pytest.raises(InputError, match=match):
        tok.apply_chat_template(msgs, reasoning_effort=effort)


def test_image_without_image_settings(tmp_path):
    write_tekken(tmp_path)  # no image section, no config.json
    t = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="image_config"):
        t.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": np.zeros((4, 4), np.uint8)}]}])


def test_parse_output(tok):
    e = tok.encode
    ids = [THINK, *e("The user wants the weather."), THINK_END, *e("Let me check."),
           CALLS, *e("get_weather"), ARGS, *e('{"city": "Paris"}'), CALLS, *e("now"), ARGS, *e("not json"),
           EOS, *e("ignored")]
    out = tok.parse_output(ids)
    assert out.reasoning == "The user wants the weather."
    assert out.content == "Let me check."
    assert out.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                              {"name": "now", "arguments": "not json"}]
    assert out.finished
    plain = tok.parse_output(e("Paris."))
    assert plain.content == "Paris." and plain.reasoning is None and not plain.tool_calls and not plain.finished
    unclosed = tok.parse_output([THINK, *e("still thinking")])
    assert unclosed.reasoning == "still thinking" and unclosed.content == ""


def test_prompt_fits_the_model_image_layout(tok):
    """A chat prompt with two images is what the model expects: its [IMG] count equals the merged patch
    count the model derives from pixel_values / image_sizes (checked without running the model)."""
    import jax.numpy as jnp
    from flax import nnx

    from mistral4_jax import Mistral3ForConditionalGeneration, ModelConfig
    from mistral4_jax.inputs import check_image_tokens

    cfg = ModelConfig.tiny()
    model = nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    msgs = [{"role": "user", "content": [{"type": "image", "image": rng.integers(0, 256, (60, 90, 3), np.uint8)},
                                         {"type": "image", "image": rng.integers(0, 256, (30, 20, 4), np.uint8)},
                                         {"type": "text", "text": "Compare."}]}]
    p = tok.apply_chat_template(msgs, image_config=ImageConfig.from_model_config(cfg))
    assert p.image_sizes.tolist() == [[84, 112], [56, 28]]  # 60x90 -> 3 rows x 4; 30x20 -> 2 rows x 1
    layout = model.layout_for(p.pixel_values, p.image_sizes)
    assert list(layout.tokens_per_image) == [3 * 4, 2 * 1]
    check_image_tokens(np.asarray([p.input_ids]), cfg.image_token_id, sum(layout.tokens_per_image))
    with pytest.raises(InputError):
        check_image_tokens(np.asarray([p.input_ids[:-3]]), cfg.image_token_id, sum(layout.tokens_per_image) + 1)
