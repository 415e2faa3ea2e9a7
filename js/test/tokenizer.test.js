import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { PromptEncoder } from "../src/prompt.js";
import { needFixtures, spec } from "../test-support/fixtures.js";

test("prompt ids, masks and system ids equal the Python tokenizer's (bundle and Qwen2-shaped tokenizers)", { skip: needFixtures }, () => {
  for (const t of spec.tokenizers) {
    const read = (name) => JSON.parse(readFileSync(`${t.dir}/${name}`, "utf8"));
    const enc = new PromptEncoder(read("tokenizer.json"), read("tokenizer_config.json"), t.section);
    assert.deepEqual(Array.from(enc.systemIds), t.system_ids, `${t.dir}: system prompt`);
    for (const c of t.cases) {
      const got = enc.encode(c.prompt);
      assert.deepEqual(Array.from(got.ids), c.ids, `${t.dir}: ${JSON.stringify(c.prompt)}`);
      assert.deepEqual(Array.from(got.mask), c.mask);
      assert.equal(got.truncated, c.truncated);
    }
  }
});
