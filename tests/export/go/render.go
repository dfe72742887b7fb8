// Renders an Ollama TEMPLATE the way Ollama does: Go's text/template over {.Messages, .System}.
// Input on stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}], "system": ""}.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
}

func main() {
	var req Request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(req.Template))
	data := map[string]any{"Messages": req.Messages, "System": req.System}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
