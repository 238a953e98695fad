// Removes what the build makes: the compiled library and the prebuilt extension in the Python package.
'use strict';
const fs = require('fs');
const path = require('path');
const pkg = require('../package.json');

const root = path.resolve(__dirname, '..');
for (const dir of ['lib', 'build-test', pkg.jupyterlab.outputDir]) {
  fs.rmSync(path.resolve(root, dir), { recursive: true, force: true });
}
fs.rmSync(path.resolve(root, 'tsconfig.tsbuildinfo'), { force: true });
