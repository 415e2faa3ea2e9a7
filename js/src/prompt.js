// Prompt ids as the bundle's text encoder expects them (manifest `prompt` section): the tokenizer is
// @huggingface/tokenizers on the bundle's tokenizer.json; truncation to max_tokens and padding with
// pad_token_id on the configured sides are done here (HF's fast tokenizer does the same for one text).

import { Tokenizer } from "@huggingface/tokenizers";

/**
 * @typedef {object} PromptSection the manifest's `prompt` section (the keys read here)
 * @property {string} system_prompt
 * @property {boolean} [use_system_prompt]
 * @property {number} max_tokens
 * @property {number} pad_token_id
 * @property {"left" | "right"} [padding_side]
 * @property {"left" | "right"} [truncation_side]
 */

export class PromptEncoder {
  /**
   * @param {object} tokenizerJson tokenizer.json @param {object} tokenizerConfig tokenizer_config.json
   * @param {PromptSection} section
   */
  constructor(tokenizerJson, tokenizerConfig, section) {
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    this.section = section;
    const s = section;
    /** The system prompt's ids: truncated to max_tokens like a prompt, never padded. */
    this.systemIds = s.use_system_prompt === false ? new Int32Array(0)
      : Int32Array.from(this._truncate(this.tokenizer.encode(s.system_prompt).ids));
  }

  /** @param {number[]} ids */
  _truncate(ids) {
    const max = this.section.max_tokens;
    if (ids.length <= max) return ids;
    return this.section.truncation_side === "left" ? ids.slice(ids.length - max) : ids.slice(0, max);
  }

  /**
   * Prompt ids padded / truncated to max_tokens and the context mask (ids != pad id: a pad token typed
   * in the prompt is masked too, as upstream does).
   * @param {string} prompt
   * @returns {{ ids: Int32Array, mask: Uint8Array, truncated: boolean }}
   */
  encode(prompt) {
    if (typeof prompt !== "string") throw new TypeError(`prompt must be a string, got ${typeof prompt}`);
    const s = this.section;
    const raw = this.tokenizer.encode(prompt).ids;
    const cut = this._truncate(raw);
    const pads = new Array(s.max_tokens - cut.length).fill(s.pad_token_id);
    const ids = Int32Array.from(s.padding_side === "left" ? [...pads, ...cut] : [...cut, ...pads]);
    const mask = Uint8Array.from(ids, (id) => (id !== s.pad_token_id ? 1 : 0));
    return { ids, mask, truncated: raw.length > s.max_tokens };
  }
}
