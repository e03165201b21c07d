"""`aa chat`, driven as a user would through a pseudo-terminal, and its conversation state in process.

The tiny aliases tie their output head to random input embeddings, so greedy decoding repeats the prompt's
last token; the models here get an untied random head (saved as an ordinary model folder, which is also
the "any model path" case) so replies are varied text and a wrong prompt shows as a different reply.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pexpect  # the dev extra
import pytest
import torch
from PIL import Image

from aa_lightning.chat.loading import load_chat_model, resolve_chat_path
from aa_lightning.chat.session import ChatError, ChatSession, GenerationSettings
from aa_lightning.models.loading import load_pretrained_models

IMAGE = os.path.join("configs", "data", "media", "image", "pizza.jpg")
VIDEO = os.path.join("configs", "data", "media", "video", "mllm_demo_data", "1.mp4")
AUDIO = os.path.join("configs", "data", "media", "audio", "speech_asr", "spk1_snt1.wav")
NEW_TOKENS = 8


def untied_copy(alias: str, target: Path) -> str:
    """``alias`` saved to ``target`` with a random output head of its own (see the module doc)."""
    model, tokenizer, processor = load_pretrained_models(alias)
    torch.manual_seed(0)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(target)
    (processor or tokenizer).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory) -> str:
    return untied_copy("tiny-qwen2-vl", tmp_path_factory.mktemp("chat_vl"))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    return untied_copy("tiny-qwen2", tmp_path_factory.mktemp("chat_text"))


class Writes(io.StringIO):
    """A text stream that remembers each write (the pieces a streamed reply arrives in)."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


def greedy(model, inputs: dict) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_chat_in_a_terminal_with_an_image(vl_model, repo_path, tmp_path):
    """Type a message, attach an image, ask about it, reset, leave: what reached the model is right."""
    transcript = tmp_path / "chat.json"
    args = ["-m", "aa_lightning.cli", "chat", vl_model, "--max_new_tokens", str(NEW_TOKENS)]
    child = pexpect.spawn(
        sys.executable,
        [*args, "--transcript", str(transcript)],
        cwd=repo_path(),
        env=dict(os.environ),
        encoding="utf-8",
        timeout=180,
    )
    screens: list[str] = []

    def say(line: str) -> str:
        child.sendline(line)
        child.expect_exact("you> ")
        screens.append(child.before.replace("\r\n", "\n"))
        return screens[-1]

    child.expect_exact("you> ")
    assert "chat template from the processor" in child.before
    assert "/image" in child.before  # the banner says how to attach media
    first = say("Hello there")
    assert "error" not in say(f"/image {IMAGE}")
    second = say("What is in the picture?")
    assert "(new conversation)" in say("/reset")
    assert "unknown command /bogus" in say("/bogus")
    assert "image file not found" in say("/image no/such.png")
    third = say("Hi again")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, screens

    turns = json.loads(transcript.read_text())["turns"]
    assert len(turns) == 3
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    assert "Hello there" in turns[0]["prompt"] and placeholder not in turns[0]["prompt"]
    assert turns[1]["prompt"].startswith(turns[0]["prompt"] + turns[0]["reply"])  # the history travels
    assert placeholder + "What is in the picture?" in turns[1]["prompt"]
    assert turns[1]["media"] == {"images": [os.path.join(repo_path(), IMAGE)]}
    assert "Hello there" not in turns[2]["prompt"] and placeholder not in turns[2]["prompt"]  # /reset

    model, tokenizer, processor = load_pretrained_models(vl_model, padding_side="left")
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image = Image.open(os.path.join(repo_path(), IMAGE)).convert("RGB")
    expanded = processor(text=[turns[1]["prompt"]], images=[image], return_tensors="pt")
    grid = expanded["image_grid_thw"][0]
    merge = processor.image_processor.merge_size
    assert turns[1]["input_ids"].count(pad_id) == int(grid.prod()) // merge**2 > 1  # expanded placeholders
    assert turns[1]["input_ids"] == expanded["input_ids"][0].tolist()
    for turn, screen, inputs in (
        (turns[0], first, processor(text=[turns[0]["prompt"]], return_tensors="pt")),
        (turns[1], second, expanded),
        (turns[2], third, processor(text=[turns[2]["prompt"]], return_tensors="pt")),
    ):
        ids = greedy(model, inputs)
        assert turn["reply_ids"] == ids
        reply = tokenizer.decode(ids, skip_special_tokens=True)
        assert turn["reply"] == reply and reply.strip()
        assert f"\nassistant> {reply}\n" in screen.replace("\r", "")  # what the user saw, streamed


def test_text_model_session_streams_the_generate_reply(text_model):
    """System prompt, history, streamed pieces, and the refusal of media a text model cannot take."""
    loaded = load_chat_model(text_model, device="cpu")
    session = ChatSession(loaded, GenerationSettings(max_new_tokens=NEW_TOKENS), system="Be brief.")
    assert session.media_kinds() == []
    with pytest.raises(ChatError, match="takes no image input"):
        session.attach("image", IMAGE)
    out = Writes()
    first = session.send("Hello there", out)
    assert len([p for p in out.pieces if p.strip()]) > 1  # arrived token by token, not at the end
    assert "".join(out.pieces).rstrip("\n") == first
    second = session.send("And then?", Writes())
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    tokenizer = loaded.tokenizer
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert session.turns[1]["prompt"] == prompt
    inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    assert tokenizer.decode(greedy(loaded.model, inputs), skip_special_tokens=True) == second
    session.reset()
    assert session.conversation() == [{"role": "system", "content": "Be brief."}]


def test_sampling_flags_are_seeded_and_checked(text_model):
    loaded = load_chat_model(text_model, device="cpu")
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.5, top_k=0)
    replies = []
    for _ in range(2):
        torch.manual_seed(3)
        replies.append(ChatSession(loaded, settings).send("Hello there", Writes()))
    assert replies[0] == replies[1]
    greedy_reply = ChatSession(loaded, GenerationSettings(max_new_tokens=NEW_TOKENS)).send(
        "Hello there", Writes()
    )
    assert replies[0] != greedy_reply  # the sampling flags reached generate
    for bad in ({"temperature": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ChatError, match=next(iter(bad))):
            GenerationSettings(**bad)


def test_video_is_attached_with_its_placeholder(vl_model, repo_path, monkeypatch):
    monkeypatch.chdir(repo_path())
    session = ChatSession(
        load_chat_model(vl_model, device="cpu"), GenerationSettings(max_new_tokens=2), num_frames=4
    )
    session.attach("video", VIDEO)
    session.send("What happens?", Writes())
    assert "<|vision_start|><|video_pad|><|vision_end|>What happens?" in session.turns[0]["prompt"]
    pad_id = session.loaded.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert session.turns[0]["input_ids"].count(pad_id) > 1
    assert session.pending == []


def test_audio_is_attached_to_an_audio_model(repo_path, monkeypatch):
    monkeypatch.chdir(repo_path())
    session = ChatSession(
        load_chat_model("tiny-qwen2-audio", device="cpu"), GenerationSettings(max_new_tokens=2)
    )
    assert session.media_kinds() == ["audio"]
    with pytest.raises(ChatError, match="takes no image input"):
        session.attach("image", IMAGE)
    session.attach("audio", AUDIO)
    session.send("What is said?", Writes())
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>What is said?" in session.turns[0]["prompt"]
    audio_id = session.loaded.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert session.turns[0]["input_ids"].count(audio_id) > 1  # expanded to one token per audio feature


def test_run_folder_means_its_export(text_model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(text_model, run / "hf_model")
    assert resolve_chat_path(str(run)) == str(run / "hf_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="hf_model/ export"):
        resolve_chat_path(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="diffusion pipeline"):
        load_chat_model("tiny-sd", device="cpu")


def test_lora_adapter_export_loads_onto_its_base(text_model, tmp_path):
    """``lora.merge_on_export: false`` writes the adapter alone; chat loads it onto the base it names."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer, _ = load_pretrained_models(text_model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained adapter changes the outputs (a fresh one is zero)
    peft_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_chat_model(str(tmp_path), device="cpu")
    ids = tokenizer(["Hello there"], return_tensors="pt")
    with torch.no_grad():
        expected = peft_model.eval()(**ids).logits
        base = load_pretrained_models(text_model)[0](**ids).logits
        got = loaded.model(**ids).logits
    assert not torch.allclose(base, expected, atol=1e-3)
    torch.testing.assert_close(got, expected)


def test_commands_change_the_conversation(text_model):
    from aa_lightning.chat.repl import handle

    session = ChatSession(load_chat_model(text_model, device="cpu"), GenerationSettings(max_new_tokens=2))
    out = Writes()
    assert handle(session, "/system Answer in French.", out) and session.system == "Answer in French."
    assert handle(session, "Bonjour", out)
    assert "Answer in French." in session.turns[-1]["prompt"] and out.getvalue().count("assistant> ") == 1
    assert handle(session, "/help", out) and "/image PATH" in out.getvalue()
    assert handle(session, "/system", out) and session.system is None
    assert handle(session, "   ", out) and len(session.turns) == 1  # an empty line sends nothing
    with pytest.raises(ChatError, match="unknown command /imgae"):
        handle(session, "/imgae x.png", out)
    assert not handle(session, "/exit", out) and not handle(session, "/quit", out)


def test_bad_model_or_flag_is_one_line_and_status_2(tmp_path, capsys):
    from aa_lightning.chat.repl import main

    for argv, message in (
        ([str(tmp_path / "missing")], "does not exist"),
        (["tiny-qwen2", "--temperature", "0"], "--temperature must be > 0"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
