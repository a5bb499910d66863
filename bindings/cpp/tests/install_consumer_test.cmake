# ctest's install.find_package: cmake --install into WORK_DIR/prefix, then a consumer project that
# knows only that prefix is configured, built and run (find_package, shared and static), a C
# program is built with the flags pkg-config gives for the installed packinfer.pc, and this
# project is configured with -DPACKINFER_LIBRARY=<the installed .so> and its examples run.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message("$ ${ARGN}\n${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

set(prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${WORK_DIR}")
run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
foreach(f include/packinfer.h include/packinfer.hpp lib/libpackinfer.so lib/libpackinfer.a
          lib/cmake/packinfer/packinfer-config.cmake lib/cmake/packinfer/packinfer-config-version.cmake
          lib/pkgconfig/packinfer.pc)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "cmake --install did not install ${f}")
  endif()
endforeach()

# find_package from a project that knows nothing but the prefix.
run("${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer-build" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_BUILD_TYPE=Release)
if(NOT run_output MATCHES "packinfer found at ${prefix}")
  message(FATAL_ERROR "the consumer found packinfer somewhere else than ${prefix}")
endif()
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/consumer-build")
foreach(exe consumer_shared consumer_static)
  run("${WORK_DIR}/consumer-build/${exe}")
  if(NOT run_output MATCHES "consumer ok")
    message(FATAL_ERROR "${exe} did not say 'consumer ok'")
  endif()
endforeach()

# pkg-config, for build systems without CMake.
if(PKG_CONFIG)
  set(ENV{PKG_CONFIG_PATH} "${prefix}/lib/pkgconfig")
  run("${PKG_CONFIG}" --modversion packinfer)
  run("${PKG_CONFIG}" --cflags --libs packinfer)
  string(STRIP "${run_output}" flags)
  separate_arguments(flags UNIX_COMMAND "${flags}")
  run("${C_COMPILER}" "${CONSUMER_DIR}/consumer.c" ${flags} -o "${WORK_DIR}/consumer_pkgconfig")
  run("${WORK_DIR}/consumer_pkgconfig")
  if(NOT run_output MATCHES "consumer ok")
    message(FATAL_ERROR "the pkg-config consumer did not say 'consumer ok'")
  endif()
else()
  message(FATAL_ERROR "pkg-config is not installed; it is needed to check packinfer.pc")
endif()
# This project itself with a prebuilt library instead of cargo: the examples build and run.
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/prebuilt-build" -G "${GENERATOR}"
    "-DPACKINFER_LIBRARY=${prefix}/lib/libpackinfer.so" "-DPACKINFER_INCLUDE_DIR=${prefix}/include"
    -DPACKINFER_BUILD_TESTS=OFF -DPACKINFER_BUILD_EXAMPLES=ON)
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/prebuilt-build")
run("${WORK_DIR}/prebuilt-build/examples/cpp/packinfer_example_engine_step")
if(NOT run_output MATCHES "layer 1 done")
  message(FATAL_ERROR "the example built against the prebuilt library did not finish")
endif()
execute_process(COMMAND ldd "${WORK_DIR}/prebuilt-build/examples/cpp/packinfer_example_engine_step" OUTPUT_VARIABLE ldd_out)
if(NOT ldd_out MATCHES "${prefix}/lib/libpackinfer.so")
  message(FATAL_ERROR "the example did not load the prebuilt library from ${prefix}/lib:\n${ldd_out}")
endif()
message("install test passed")
