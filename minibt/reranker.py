"""`minibt.Reranker`: scores of (query, document) pairs in the habits of sentence-transformers' CrossEncoder.

    rr = minibt.Reranker("cross-encoder/ms-marco-MiniLM-L6-v2")      # a *ForSequenceClassification checkpoint
    rr.predict([("query", "a document"), ("query", "another")])     # (2,) numpy float32, CrossEncoder's activation
    rr.rank("query", ["a document", "another"])                     # [{"corpus_id", "score"}], best first

    rr = minibt.Reranker("Qwen/Qwen3-Reranker-0.6B")                # a *ForCausalLM checkpoint: an LLM reranker

Two kinds, told apart by config.json "architectures":
  cross-encoder  *ForSequenceClassification (BERT-likes, XLM-RoBERTa, ModernBERT, ...): the pair tokenised as a text
                 pair, cut longest-first to max_length, the classifier's logits.
  llm            *ForCausalLM, scored as Qwen3-Reranker's model card does: each pair in its prompt (PREFIX, then
                 "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}", then SUFFIX; the prefix and
                 suffix tokenised on their own, the middle cut from its end to fit max_length), batches left-padded,
                 one forward per batch keeping only the last position's logits. The raw score is
                 logit("yes") - logit("no"), as sentence-transformers' LogitScore module writes it, so the default
                 sigmoid gives softmax([logit("no"), logit("yes")])[1], the model card's probability.

What a folder saved by sentence-transformers says is read as CrossEncoder reads it: the activation
(config_sentence_transformers.json "activation_fn", else config.json "sentence_transformers" / the older
"sbert_ce_default_activation_function"; without one: sigmoid for one label, identity for several), the default
prompt (prompts[default_prompt_name]: prepended to each query of a cross-encoder, the instruction of an LLM
reranker), sentence_bert_config.json max_seq_length and do_lower_case, and an LLM reranker's LogitScore module
(its true/false token ids in place of looking up "yes" and "no").
"""
from __future__ import annotations

import importlib
import warnings

import torch

from .config import Fields, read_json
from .errors import ConfigError, InputError
from .hub import inside, resolve
from .tokenizer import text_list

# Qwen3-Reranker's prompt, from its model card
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# A sentence-transformers LLM reranker renders its pairs with its chat template; minibt writes Qwen3-Reranker's
# prompt itself, so such a folder is taken only when its template is that prompt (it holds this sentence).
PROMPT_MARK = "Judge whether the Document meets the requirements based on the Query and the Instruct"

ST_MODULES = ("Transformer", "LogitScore")     # the sentence-transformers modules a reranker folder may hold


def architecture(config: dict, where) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConfigError(f"{where}: no \"architectures\" to tell a reranker by (a *ForSequenceClassification "
                          "cross-encoder or a *ForCausalLM LLM reranker)")
    return archs[0]


def st_modules(folder) -> list:
    """modules.json of a sentence-transformers folder (type names, paths); [] when there is none."""
    modules = read_json(inside(folder, "modules.json"), kind=list) or []
    if not all(isinstance(m, dict) and isinstance(m.get("type", ""), str) for m in modules):
        raise ConfigError(f"{folder / 'modules.json'}: must be a list of objects")
    return modules


def kind_of(folder, config: dict | None = None) -> str | None:
    """"llm" (a *ForCausalLM checkpoint that is not a sentence-embedding model: modules.json has no Pooling),
    "cross-encoder" (*ForSequenceClassification), or None. `minibt serve` asks this to serve LLM rerankers."""
    config = config if config is not None else read_json(inside(folder, "config.json"), required=True)
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if arch.endswith("ForSequenceClassification"):
        return "cross-encoder"
    if arch.endswith("ForCausalLM"):
        pooled = any(str(m.get("type", "")).endswith("Pooling") for m in st_modules(folder))
        return None if pooled else "llm"
    return None


def resolve_activation(path, where):
    """A dotted path as sentence-transformers saves it ("torch.nn.modules.activation.Sigmoid") -> an instance.
    Like CrossEncoder without trust_remote_code, only torch's are taken; any other is ignored with a warning."""
    if not isinstance(path, str) or not path.startswith("torch."):
        warnings.warn(f"{where}: activation function {path!r} is not one of torch's; using the default "
                      "(sigmoid for one label, identity for several), as sentence-transformers does")
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, TypeError) as e:
        raise ConfigError(f"{where}: activation function {path!r} cannot be made ({e})") from None


class Prompts:
    """The LLM reranker's tokenizer: a (query, document) pair becomes Qwen3-Reranker's prompt, tokenised as its model
    card does (PREFIX and SUFFIX whole, the middle cut to fit when truncating: from its end, or from its start with
    direction="left"); a plain string is tokenised as the checkpoint's tokenizer does. pad() pads on the left.
    `minibt serve` tokenises with it, so the server's scores are Reranker.predict's."""

    def __init__(self, tok, instruction: str, limit: int):
        self.tok, self.instruction, self.model_max_length = tok, instruction, limit
        self.folder, self.pad_token_id, self.type_ids = tok.folder, tok.pad_token_id, False
        self.prefix, self.suffix = tok.encode([PREFIX, SUFFIX], add_special_tokens=False)
        self.fixed = len(self.prefix.ids) + len(self.suffix.ids)

    def encode(self, texts, *, truncation=False, max_length=None, add_special_tokens=True, direction="right"):
        from tokenizers import Encoding
        texts = text_list(texts, pairs=True)
        if all(isinstance(t, str) for t in texts):
            return self.tok.encode(texts, truncation=truncation, max_length=max_length,
                                   add_special_tokens=add_special_tokens, direction=direction)
        bad = next((i for i, t in enumerate(texts) if isinstance(t, str)), None)
        if bad is not None:
            raise InputError(f"texts[{bad}] is a string; an LLM reranker scores (query, document) pairs")
        bodies = [BODY.format(instruction=self.instruction, query=q, document=d) for q, d in texts]
        limit = None
        if truncation:
            limit = max_length or self.model_max_length
            if limit <= self.fixed:
                raise InputError(f"max_length={limit} leaves no room for the query and document: the prompt's "
                                 f"fixed prefix and suffix take {self.fixed} tokens")
        middle = self.tok.encode(bodies, truncation=truncation, max_length=limit and limit - self.fixed,
                                 add_special_tokens=add_special_tokens, direction=direction)
        return [Encoding.merge([self.prefix, m, self.suffix], growing_offsets=True) for m in middle]

    def pad(self, encs, padding_side="left") -> dict:
        return self.tok.pad(encs, padding_side="left")


class Reranker:
    """A reranker and its tokenizer: a cross-encoder or an LLM reranker (see the module's docstring).
    name_or_folder: a hub repo id or a local folder. max_length: tokens per pair (default: the smallest of
    sentence_bert_config.json max_seq_length, tokenizer_config.json model_max_length and the model's positions).
    instruction: prepended to each query (cross-encoder, as a sentence-transformers prompt) or the <Instruct> line
    (LLM; default: the folder's default prompt, else Qwen3-Reranker's web-search instruction).
    quantize: "int8" | "int4", as minibt.from_hub."""

    def __init__(self, name_or_folder, *, dtype=None, attn: str = "auto", device="cpu", revision=None,
                 max_length: int | None = None, instruction: str | None = None, quantize: str | None = None):
        from .embedding import text_settings
        from .loading import load
        from .tokenizer import load_tokenizer
        folder = resolve(name_or_folder, revision)
        config_path = inside(folder, "config.json")
        config = read_json(config_path, required=True)
        arch = architecture(config, config_path)
        self.kind = kind_of(folder, config)
        if self.kind is None:
            pooled = arch.endswith("ForCausalLM")
            raise ConfigError(f"{config_path}: architectures[0] = {arch!r} is not a reranker: minibt.Reranker takes a "
                              "*ForSequenceClassification cross-encoder or a *ForCausalLM LLM reranker"
                              + (" (this one is a sentence-embedding model, modules.json has Pooling: use "
                                 "minibt.Encoder)" if pooled else ""))
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise InputError(f"max_length={max_length!r} must be an integer >= 1 (or None)")
        if instruction is not None and not isinstance(instruction, str):
            raise InputError(f"instruction must be a string (or None), not {type(instruction).__name__}")
        modules = st_modules(folder)
        odd = [m.get("type") for m in modules if not str(m.get("type", "")).endswith(ST_MODULES)]
        if odd:
            raise ConfigError(f"{folder / 'modules.json'}: module {odd[0]!r} is not supported in a reranker "
                              f"(minibt reads {', '.join(ST_MODULES)})")
        st_path = inside(folder, "config_sentence_transformers.json")
        st = Fields(read_json(st_path) or {}, str(st_path))
        default = st.c.get("default_prompt_name")
        if instruction is None and default is not None:
            instruction = st.dict("prompts").get(default)
            if not isinstance(instruction, str):
                st.fail("default_prompt_name", default, "names no prompt (a string) in \"prompts\"")
        max_seq_length, self.lowercase = text_settings(folder)
        self.tokenizer = load_tokenizer(folder)
        if self.kind == "llm":                           # every check that needs no weights, before loading them
            self.true_id, self.false_id = self._score_tokens(folder, modules)
        self.model = load(folder, attn=attn, dtype=dtype, device=device, head="causal-lm" if self.kind == "llm"
                          else "sequence-classification", quantize=quantize)
        self.max_length = max_length or min(x for x in (max_seq_length, self.tokenizer.model_max_length,
                                                         self.model.max_length()) if x)
        self.num_labels = 1 if self.kind == "llm" else self.model.config.num_labels
        if self.kind == "llm":
            vocab = self.model.config.vocab_size
            for i in (self.true_id, self.false_id):
                if i is not None and not 0 <= i < vocab:
                    raise ConfigError(f"{folder}: score token id {i} is outside the model's vocabulary ({vocab})")
            self.instruction = INSTRUCTION if instruction is None else instruction
            self.prompts = Prompts(self.tokenizer, self.instruction, self.max_length)
        else:
            self.instruction = instruction
        self.activation_fn = self._default_activation(st, config, config_path)

    # ---------------------------------------------------------------------------------------------- reading

    def _score_tokens(self, folder, modules):
        """(true id, false id or None): the LogitScore module's when the folder has one (its chat template must be
        Qwen3-Reranker's prompt), else "yes" and "no" looked up in the tokenizer, as CrossEncoder does."""
        logit = next((m for m in modules if str(m.get("type", "")).endswith("LogitScore")), None)
        if logit is None:
            ids = [self.tokenizer.tok.token_to_id(t) for t in ("yes", "no")]
            missing = [t for t, i in zip(("yes", "no"), ids) if i is None]
            if missing:
                raise ConfigError(f"{self.tokenizer.folder}: the tokenizer has no "
                                  f"{' and no '.join(map(repr, missing))} token, which an LLM reranker's score is "
                                  "read from (logit of \"yes\" - \"no\")")
        else:
            path = inside(folder, f"{module_folder(logit)}/config.json")
            f = Fields(read_json(path, required=True), str(path))
            ids = [f.int("true_token_id", min=0), f.int("false_token_id", None, min=0, none_ok=True)]
            if f.c.get("module_input_name", "causal_logits") != "causal_logits":
                f.fail("module_input_name", f.c.get("module_input_name"), "is not supported (minibt reads "
                       "'causal_logits')")
            template = template_of(folder, self.tokenizer.config)
            if template is None or PROMPT_MARK not in template:
                raise ConfigError(f"{folder}: a sentence-transformers LLM reranker whose chat template is not "
                                  "Qwen3-Reranker's prompt; minibt writes that prompt only (its template must "
                                  f"contain {PROMPT_MARK!r})")
        return ids[0], ids[1]

    def _default_activation(self, st, config, config_path):
        """CrossEncoder's order: config_sentence_transformers.json, then config.json's sentence_transformers (v4)
        or sbert_ce_default_activation_function (older), then sigmoid for one label and identity for several."""
        found = None
        if st.c.get("activation_fn") is not None:
            found = resolve_activation(st.c["activation_fn"], f"{st.where} activation_fn")
        if found is None:
            old = Fields(config, str(config_path)).dict("sentence_transformers").get("activation_fn") \
                or config.get("sbert_ce_default_activation_function")
            if old is not None:
                found = resolve_activation(old, f"{config_path} activation_fn")
        if found is not None:
            return found
        return torch.nn.Sigmoid() if self.num_labels == 1 else torch.nn.Identity()

    # ---------------------------------------------------------------------------------------------- scoring

    def encode(self, pairs) -> list:
        """Token encodings of (query, document) pairs as this reranker reads them, cut to max_length."""
        if self.kind == "cross-encoder" and self.instruction:
            pairs = [(self.instruction + q, d) for q, d in pairs]      # a sentence-transformers prompt
        if self.lowercase:
            pairs = [(q.lower(), d.lower()) for q, d in pairs]
        if self.kind == "llm":
            return self.prompts.encode(pairs, truncation=True, max_length=self.max_length)
        return self.tokenizer.encode(pairs, truncation=True, max_length=self.max_length)

    @torch.inference_mode()
    def forward(self, encs) -> torch.Tensor:
        """One batch of encodings -> (rows, num_labels) float32 raw scores on the CPU, in one forward: a
        cross-encoder's logits, or an LLM reranker's logit(true) - logit(false) at the last position."""
        device = next(self.model.parameters()).device
        if self.kind == "llm":
            batch = self.prompts.pad(encs)
            out = self.model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             last_only=True)
            logits = out.logits[:, -1].float()
            score = logits[:, self.true_id]
            if self.false_id is not None:
                score = score - logits[:, self.false_id]
            return score[:, None].cpu()
        batch = {k: v.to(device) for k, v in self.tokenizer.pad(encs).items()}
        return self.model(**batch).logits.float().cpu()

    def predict(self, pairs, batch_size: int = 32, activation_fn=None, apply_softmax: bool = False, *,
                convert_to_numpy: bool = True, convert_to_tensor: bool = False):
        """Scores of (query, document) pairs, in their order, as CrossEncoder.predict: the activation (default:
        the checkpoint's, see the module docstring; pass torch.nn.Identity() for raw scores) on each row, (N,) for
        one label and (N, labels) for several (apply_softmax=True: a softmax over them). One pair [q, d] gives one
        score. convert_to_tensor=True: a torch tensor; else numpy (the default), or a list of tensors."""
        single = isinstance(pairs, (list, tuple)) and len(pairs) > 0 and isinstance(pairs[0], str)
        items = [pairs] if single else pairs
        if isinstance(items, str):
            raise InputError("predict() takes (query, document) pairs, not a string")
        try:
            items = list(items)
        except TypeError:
            raise InputError(f"predict() takes a list of (query, document) pairs, not {type(pairs).__name__}") from None
        bad = next((i for i, p in enumerate(items) if not (isinstance(p, (list, tuple)) and len(p) == 2
                                                         and all(isinstance(x, str) for x in p))), None)
        if bad is not None:
            what = "the pair" if single else f"pairs[{bad}]"
            raise InputError(f"{what} must be a (query, document) pair of 2 strings, got {shown(items[bad])}")
        check_batch_size(batch_size)
        scores = self._scores([tuple(p) for p in items], batch_size)
        if activation_fn is None:
            activation_fn = self.activation_fn
        if activation_fn is not None and len(scores):
            scores = activation_fn(scores)
        if self.num_labels == 1:
            scores = scores.reshape(-1)
        elif apply_softmax and len(scores):
            scores = scores.softmax(-1)
        from .embedding import as_requested
        return as_requested(scores, single, convert_to_numpy, convert_to_tensor)

    def rank(self, query: str, documents, top_k: int | None = None, return_documents: bool = False,
             batch_size: int = 32) -> list:
        """[{"corpus_id", "score"(, "text")}] for each document scored against query, best first, the first top_k
        (all when None), as CrossEncoder.rank. Needs one score per pair (num_labels 1)."""
        if self.num_labels != 1:
            raise InputError(f"rank() needs a reranker with one score; {self.model.source} has {self.num_labels} "
                             "labels: use predict() with pairs")
        if not isinstance(query, str):
            raise InputError(f"query must be a string, got {shown(query)}")
        if isinstance(documents, str):
            raise InputError("documents must be a list of strings, not one string")
        try:
            documents = list(documents)
        except TypeError:
            raise InputError(f"documents must be a list of strings, got {shown(documents)}") from None
        if not documents:
            raise InputError("documents is an empty list: nothing to rank")
        bad = next((i for i, d in enumerate(documents) if not isinstance(d, str)), None)
        if bad is not None:
            raise InputError(f"documents[{bad}] must be a string, got {shown(documents[bad])}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"top_k={top_k!r} must be an integer >= 1 (or None)")
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size, convert_to_tensor=True).tolist()
        results = [{"corpus_id": i, "score": s, **({"text": documents[i]} if return_documents else {})}
                   for i, s in enumerate(scores)]
        return sorted(results, key=lambda r: r["score"], reverse=True)[:top_k]

    def _scores(self, pairs, batch_size) -> torch.Tensor:
        """(N, num_labels) raw float32 scores: shortest pairs first, batch_size rows per forward."""
        out = torch.empty(len(pairs), self.num_labels)
        if not pairs:
            return out
        encs = self.encode(pairs)
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self.forward([encs[i] for i in idx])
        return out


def module_folder(module: dict) -> str:
    path = module.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"modules.json: module {module.get('type')!r} has no folder (\"path\")")
    return path


def template_of(folder, tokenizer_config: dict) -> str | None:
    """The chat template sentence-transformers would render: chat_template.jinja, else tokenizer_config.json's."""
    path = inside(folder, "chat_template.jinja")
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):           # named templates: [{"name", "template"}]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else None


def check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be an integer >= 1")


def shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
