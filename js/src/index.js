// Environment-neutral exports: the loop, the RNG, the math and the npz reader. `node.js` and `web.js`
// add Pipeline.fromBundle bound to onnxruntime-node or onnxruntime-web.

export { BundleError, SelfCheckError, Pipeline as BasePipeline, SCHEMA_VERSION, RNG_CONTRACT_VERSION, checkManifest, parseManifestText } from "./pipeline.js";
export { PortableRNG, drawPlan, iterDraws, philox4x64_10 } from "./rng.js";
export { cfgMix, softmaxRow, filterTopKTopP, sampleStage, invFreq, contextPositions, ropeCosSin1d, ropeCosSin2d, iddpmStep } from "./math.js";
export { parseNpz, parseNpy } from "./npz.js";
export { PromptEncoder } from "./prompt.js";
